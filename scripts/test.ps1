# Thin wrapper: finds Python and runs `python -m flash_mla_build test`; see BUILD_WINDOWS.md.
# Usage: powershell -ExecutionPolicy Bypass -File scripts\test.ps1 [options]
. (Join-Path $PSScriptRoot '_python.ps1')
Invoke-FlashMlaBuild -Command 'test' -Arguments $args
