#!/usr/bin/env bash
# Thin wrapper: finds Python and runs `python -m flash_mla_build check-env`; see BUILD_WINDOWS.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_python.sh
. "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
flash_mla_run check-env "$@"
