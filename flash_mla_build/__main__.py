"""Command line of the build tooling; the scripts/*.sh and scripts/*.ps1 twins call it.

    python -m flash_mla_build check-env [--json]
    python -m flash_mla_build build [--venv PATH] [--no-smoke] [--dry-run] ...
    python -m flash_mla_build smoke [--wheel PATH] [--torch-spec SPEC] [--dry-run] ...
    python -m flash_mla_build test [--venv PATH] [--dry-run] [pytest args...]
    python -m flash_mla_build lint [PATH ...]

Each subcommand's own --help lists its options.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = ("check-env", "build", "smoke", "test", "lint")


def _usage() -> str:
    return ("usage: python -m flash_mla_build {" + ",".join(COMMANDS) + "} [options]\n"
            "run a command with --help for its options")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    # Imported per command so that `lint` and `check-env` work without anything the
    # build steps need.
    if command == "check-env":
        from . import check_env
        return check_env.main(rest)
    if command == "lint":
        from . import lint
        return lint.main(rest)
    if command in ("build", "smoke", "test"):
        from . import workflow
        return workflow.main([command, *rest])
    print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
