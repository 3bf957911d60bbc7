# Thin wrapper: finds Python and runs `python -m flash_mla_build smoke`; see BUILD_WINDOWS.md.
# Usage: powershell -ExecutionPolicy Bypass -File scripts\smoke.ps1 [options]
. (Join-Path $PSScriptRoot '_python.ps1')
Invoke-FlashMlaBuild -Command 'smoke' -Arguments $args
