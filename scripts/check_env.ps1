# Thin wrapper: finds Python and runs `python -m flash_mla_build check-env`; see BUILD_WINDOWS.md.
# Usage: powershell -ExecutionPolicy Bypass -File scripts\check_env.ps1 [options]
. (Join-Path $PSScriptRoot '_python.ps1')
Invoke-FlashMlaBuild -Command 'check-env' -Arguments $args
