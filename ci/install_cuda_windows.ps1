# Installs the CUDA compiler on a GitHub Windows runner (windows-2022) from NVIDIA's
# redistributable archives, then exports CUDA_PATH / CUDA_HOME and puts nvcc on PATH for
# the following workflow steps.
# Usage: ci\install_cuda_windows.ps1 -Version 13.0.2
#
# Why the archives and not the network installer: the installer's silent mode takes
# sub-package names (nvcc_13.0, ...) whose 13.x spelling changed (crt and nvvm split out
# of nvcc; the CCCL headers' package renamed) and an unknown name fails the whole install.
# Each release publishes redistrib_<version>.json, which names every component and the
# sha256 of its archive, so this script reads the names from NVIDIA's own list, checks
# each download, and then checks that the files the build needs are really there.
param(
    [Parameter(Mandatory = $true)][string]$Version
)
$ErrorActionPreference = 'Stop'

if ($Version -notmatch '^(\d+)\.(\d+)\.(\d+)$') {
    throw "Version must be <major>.<minor>.<patch> such as 13.0.2, got '$Version'"
}
$major = [int]$Matches[1]
$short = "$($Matches[1]).$($Matches[2])"
$base = 'https://developer.download.nvidia.com/compute/cuda/redist'

# nvcc and its crt headers and nvvm (separate components from CUDA 13 on), the static
# runtime, the CCCL headers cuda_bf16.h includes, and cuobjdump for the wheel check.
$wanted = @('cuda_nvcc', 'cuda_cudart', 'cuda_cccl', 'cuda_cuobjdump')
if ($major -ge 13) { $wanted += @('cuda_crt', 'libnvvm') }

$manifestUrl = "$base/redistrib_$Version.json"
Write-Host "reading $manifestUrl"
$manifest = Invoke-RestMethod -Uri $manifestUrl -UseBasicParsing
$available = @($manifest.PSObject.Properties.Name)
$missing = @($wanted | Where-Object { $available -notcontains $_ })
if ($missing.Count -gt 0) {
    throw "redistrib_$Version.json has no component $($missing -join ', '); it lists: $($available -join ', ')"
}

$root = Join-Path $env:RUNNER_TEMP "cuda-$Version"
$work = Join-Path $env:RUNNER_TEMP 'cuda-archives'
New-Item -ItemType Directory -Force -Path $root, $work | Out-Null
foreach ($name in $wanted) {
    $entry = $manifest.$name.'windows-x86_64'
    if ($null -eq $entry) {
        throw "component $name of CUDA $Version has no windows-x86_64 archive"
    }
    $zip = Join-Path $work ([System.IO.Path]::GetFileName($entry.relative_path))
    Write-Host "downloading $name $($manifest.$name.version)"
    Invoke-WebRequest -Uri "$base/$($entry.relative_path)" -OutFile $zip -UseBasicParsing
    $hash = (Get-FileHash -Algorithm SHA256 -Path $zip).Hash.ToLowerInvariant()
    if ($hash -ne $entry.sha256) {
        throw "sha256 of $zip is $hash, the manifest says $($entry.sha256)"
    }
    $unpacked = Join-Path $work $name
    Expand-Archive -Path $zip -DestinationPath $unpacked -Force
    # Each archive holds one top folder (<component>-windows-x86_64-<version>-archive)
    # with bin/, include/, lib/, ...: merge its contents into the toolkit root.
    $top = Get-ChildItem -Path $unpacked -Directory | Select-Object -First 1
    Copy-Item -Path (Join-Path $top.FullName '*') -Destination $root -Recurse -Force
    Remove-Item -Recurse -Force $unpacked, $zip
}

# What the build reads; CCCL sits in include\cccl from CUDA 13 on (nvcc adds that path).
$required = @('bin\nvcc.exe', 'bin\cuobjdump.exe', 'include\cuda_runtime.h', 'include\cuda_bf16.h',
              'include\crt\host_config.h', 'lib\x64\cudart_static.lib')
$absent = @($required | Where-Object { -not (Test-Path (Join-Path $root $_)) })
if (-not ((Test-Path (Join-Path $root 'include\cuda\std')) -or (Test-Path (Join-Path $root 'include\cccl\cuda\std')))) {
    $absent += 'include\cuda\std or include\cccl\cuda\std (CCCL)'
}
if (-not (Get-ChildItem -Path $root -Recurse -Filter 'cicc.exe' -ErrorAction SilentlyContinue)) {
    $absent += 'nvvm\bin\cicc.exe'
}
if ($absent.Count -gt 0) {
    throw "CUDA $Version at $root lacks: $($absent -join ', ')"
}

$nvcc = Join-Path $root 'bin\nvcc.exe'
& $nvcc --version
if ($LASTEXITCODE -ne 0) { throw "nvcc --version failed with exit code $LASTEXITCODE" }
Add-Content -Path $env:GITHUB_ENV -Value "CUDA_PATH=$root"
Add-Content -Path $env:GITHUB_ENV -Value "CUDA_HOME=$root"
Add-Content -Path $env:GITHUB_ENV -Value "CUDA_PATH_V$($short.Replace('.', '_'))=$root"
Add-Content -Path $env:GITHUB_PATH -Value (Join-Path $root 'bin')
