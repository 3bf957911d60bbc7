# Installs the CUDA compiler on a GitHub Windows runner (windows-2022) with NVIDIA's
# network installer, silently and only the parts the build needs, then exports
# CUDA_PATH / CUDA_HOME and puts nvcc on PATH for the following workflow steps.
# Usage: ci\install_cuda_windows.ps1 -Version 12.9.1
param(
    [Parameter(Mandatory = $true)][string]$Version
)
$ErrorActionPreference = 'Stop'

if ($Version -notmatch '^(\d+)\.(\d+)\.(\d+)$') {
    throw "Version must be <major>.<minor>.<patch> such as 12.9.1, got '$Version'"
}
$major = [int]$Matches[1]
$short = "$($Matches[1]).$($Matches[2])"

# Sub-package names of the network installer: <name>_<major.minor>. CUDA 13 split
# crt and nvvm out of nvcc and renamed the CCCL headers package.
$names = @('nvcc', 'cudart', 'cuobjdump', 'visual_studio_integration')
if ($major -ge 13) { $names += @('crt', 'nvvm', 'cccl') } else { $names += @('thrust') }
$packages = $names | ForEach-Object { "$($_)_$short" }

$url = "https://developer.download.nvidia.com/compute/cuda/$Version/network_installers/cuda_$($Version)_windows_network.exe"
$installer = Join-Path $env:RUNNER_TEMP 'cuda_network.exe'
Write-Host "downloading $url"
Invoke-WebRequest -Uri $url -OutFile $installer -UseBasicParsing
Write-Host "installing: $($packages -join ' ')"
$process = Start-Process -FilePath $installer -ArgumentList (@('-s') + $packages) -Wait -PassThru
if ($process.ExitCode -ne 0) {
    throw "the CUDA installer exited with code $($process.ExitCode)"
}
Remove-Item $installer

$root = Join-Path $env:ProgramFiles "NVIDIA GPU Computing Toolkit\CUDA\v$short"
$nvcc = Join-Path $root 'bin\nvcc.exe'
if (-not (Test-Path $nvcc)) {
    throw "nvcc.exe not found at $nvcc after the install"
}
& $nvcc --version
Add-Content -Path $env:GITHUB_ENV -Value "CUDA_PATH=$root"
Add-Content -Path $env:GITHUB_ENV -Value "CUDA_HOME=$root"
Add-Content -Path $env:GITHUB_PATH -Value (Join-Path $root 'bin')
