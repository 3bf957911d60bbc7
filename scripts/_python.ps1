# Dot-sourced by the scripts\*.ps1 wrappers. Finds a Python >= 3.9 ($env:PYTHON first,
# then python, python3, then the launcher as `py -3`) and runs
# `python -m flash_mla_build <command> <args...>`. All build logic lives in
# flash_mla_build so that Windows and Linux share it; keep this file thin.

function Find-FlashMlaPython {
    $candidates = @()
    if ($env:PYTHON) { $candidates += , @($env:PYTHON) }
    $candidates += , @('python')
    $candidates += , @('python3')
    $candidates += , @('py', '-3')
    foreach ($candidate in $candidates) {
        $exe = $candidate[0]
        $prefix = @($candidate | Select-Object -Skip 1)
        if (-not (Get-Command $exe -ErrorAction SilentlyContinue)) { continue }
        # The Microsoft Store alias "python.exe" exits non-zero here, so it is skipped.
        & $exe @prefix -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>$null | Out-Null
        if ($LASTEXITCODE -eq 0) { return , $candidate }
    }
    return $null
}

function Invoke-FlashMlaBuild {
    param(
        [Parameter(Mandatory = $true)][string]$Command,
        [string[]]$Arguments = @()
    )
    $python = Find-FlashMlaPython
    if ($null -eq $python) {
        Write-Host 'error: no Python >= 3.9 found (tried $env:PYTHON, python, python3, py -3).'
        Write-Host 'fix: install Python 3.9 or newer (python.org installer, "Add python.exe to PATH"), or set $env:PYTHON to its full path.'
        exit 2
    }
    $root = Split-Path -Parent $PSScriptRoot
    $separator = [System.IO.Path]::PathSeparator
    $savedPythonPath = $env:PYTHONPATH
    # The repository root goes on PYTHONPATH (not the working directory) so that
    # relative paths given by the user keep meaning what they meant where they typed them.
    if ($savedPythonPath) { $env:PYTHONPATH = "$root$separator$savedPythonPath" } else { $env:PYTHONPATH = $root }
    $exe = $python[0]
    $prefix = @($python | Select-Object -Skip 1)
    try {
        & $exe @prefix -m flash_mla_build $Command @Arguments
        $code = $LASTEXITCODE
    }
    finally {
        $env:PYTHONPATH = $savedPythonPath
    }
    exit $code
}
