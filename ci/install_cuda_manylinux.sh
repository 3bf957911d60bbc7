#!/usr/bin/env bash
# cibuildwheel before-all (Linux): installs the CUDA compiler, headers, static
# cudart and cuobjdump into the manylinux_2_28 (AlmaLinux 8) build image from
# NVIDIA's RHEL 8 repository, and points /usr/local/cuda at it.
# FLASH_MLA_CI_CUDA=<major.minor> (e.g. 12.9 or 13.0) chooses the release.
set -euo pipefail

version="${FLASH_MLA_CI_CUDA:?set FLASH_MLA_CI_CUDA to the CUDA release to install, e.g. 12.9}"
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+$ ]]; then
  echo "error: FLASH_MLA_CI_CUDA must be <major>.<minor> such as 12.9, got '$version'" >&2
  exit 2
fi
dashed="${version//./-}"

case "$(uname -m)" in
  x86_64) repo_arch="x86_64" ;;
  aarch64) repo_arch="sbsa" ;;
  *) echo "error: no CUDA repository for machine $(uname -m)" >&2; exit 2 ;;
esac

dnf install -y dnf-plugins-core
dnf config-manager --add-repo \
  "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${repo_arch}/cuda-rhel8.repo"
# cuda-minimal-build: nvcc, crt/nvvm, cudart (static included), CCCL, driver API
# headers and the libcuda stub; cuobjdump: the wheel verifier's cubin listing.
dnf install -y "cuda-minimal-build-${dashed}" "cuda-cuobjdump-${dashed}"
dnf clean all

ln -sfn "/usr/local/cuda-${version}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
