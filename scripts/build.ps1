# Thin wrapper: finds Python and runs `python -m flash_mla_build build`; see BUILD_WINDOWS.md.
# Usage: powershell -ExecutionPolicy Bypass -File scripts\build.ps1 [options]
. (Join-Path $PSScriptRoot '_python.ps1')
Invoke-FlashMlaBuild -Command 'build' -Arguments $args
