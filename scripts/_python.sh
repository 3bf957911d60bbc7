#!/usr/bin/env bash
# Sourced by the scripts/*.sh wrappers. Finds a Python >= 3.9 ($PYTHON first, then
# python3, then python) and runs `python -m flash_mla_build <command> <args...>`.
# All build logic lives in flash_mla_build so that Linux and Windows share it.

flash_mla_repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

flash_mla_find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' >/dev/null 2>&1; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

flash_mla_run() {
  local python root
  if ! python="$(flash_mla_find_python)"; then
    echo "error: no Python >= 3.9 found (tried \$PYTHON, python3, python)." >&2
    echo "fix: install Python 3.9 or newer, or set PYTHON=/path/to/python." >&2
    return 2
  fi
  root="$(flash_mla_repo_root)"
  # The repository root goes on PYTHONPATH (not the working directory) so that
  # relative paths given by the user keep meaning what they meant where they typed them.
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m flash_mla_build "$@"
}
