"""The build, smoke and test workflows behind scripts/{build,smoke,test}.{sh,ps1}.

    python -m flash_mla_build build [--venv PATH] [--fresh] [--archs LIST] [--no-smoke] [--isolated]
    python -m flash_mla_build smoke [--wheel PATH] [--isolated] [--torch-spec SPEC]
    python -m flash_mla_build test  [--venv PATH] [pytest args...]

Every step prints as ``[k/N] what`` and every command as ``+ cmd``, so a user (and a
bug report) shows exactly what ran. ``--dry-run`` prints the same lines without
running anything; ``--platform windows|linux`` (dry runs only) shows another OS's
command lines, which is how the Windows commands are tested on Linux.

Build: a preflight check with the Python running this (nothing installed yet: Python,
Windows long paths against the venv path, the developer shell's target arch); a build
venv (--venv, else .venv-build, created when missing or with --fresh) gets the build
requirements of pyproject.toml (plus the PyPI CUDA toolkit when no nvcc is installed,
which the build then uses, and NVIDIA's cuobjdump wheel when there is no cuobjdump);
check-env runs inside it and stops the build on blockers; then ``pip wheel . -w dist
--no-deps --no-build-isolation -v`` (verbose so ninja's [n/N] progress shows) and the
wheel check. Then the wheel is installed where the user is: into the Python that ran
the build (its own torch is kept; one without torch gets torch==2.13.0), and
``python -m flash_mla.smoke`` runs there, from dist/ so that the installed package is
imported; its exit code is ours. ``--isolated`` installs into a fresh venv
(.venv-smoke) instead, with --torch-spec or this Python's torch version (CI uses it).

Smoke: the same install-and-smoke steps for an existing wheel (newest in dist/).

Test: installs what the tests need into the current interpreter (or --venv) only
when missing (requirements/test.txt; torch from FLASH_MLA_TEST_TORCH, default
torch==2.13.0), then ``python -m pytest -q tests`` from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["Call", "Runner", "Host", "WorkflowError", "build", "smoke", "test", "main", "read_build_requires",
           "read_requirements", "default_torch_spec", "newest_wheel"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TORCH = "torch==2.13.0"
BUILD_VENV = ".venv-build"
SMOKE_VENV = ".venv-smoke"
# NVIDIA's PyPI package holding cuobjdump alone (a few hundred KB), for the wheel check.
CUOBJDUMP_WHEEL = "nvidia-cuda-cuobjdump"
TEST_REQUIREMENTS = Path("requirements") / "test.txt"
PYTORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
# Variables that would make a venv's Python import the source tree instead of the
# installed wheel, or another Python's standard library.
_LEAKY_VARS = ("PYTHONPATH", "PYTHONHOME")

# Prints the names (argv) whose distributions are not installed, as JSON.
_PROBE = (
    "import json, sys\n"
    "from importlib import metadata\n"
    "missing = []\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        metadata.version(name)\n"
    "    except metadata.PackageNotFoundError:\n"
    "        missing.append(name)\n"
    "print(json.dumps(missing))\n"
)


class WorkflowError(RuntimeError):
    """A step failed; the message names the step and what to do."""


# ----------------------------------------------------------------------------------
# Running commands
# ----------------------------------------------------------------------------------
def _show(cmd: Sequence[object]) -> str:
    parts = []
    for part in cmd:
        text = str(part)
        if "\n" in text:
            text = "<inline script>"
        parts.append(f'"{text}"' if (not text or re.search(r"[\s\"';&|<>()*]", text)) else text)
    return " ".join(parts)


def _print(line: str) -> None:
    # Flushed: our lines must come out before the output of the command they announce.
    print(line, flush=True)


@dataclass
class Call:
    """One command the workflow ran (or, in a dry run, would run)."""

    argv: List[str]
    cwd: Optional[str] = None
    env: Optional[dict] = None


@dataclass
class Runner:
    """Runs (or, with dry_run, only prints and records) the workflow's commands."""

    dry_run: bool = False
    log: Callable[[str], None] = _print
    calls: List[Call] = field(default_factory=list)

    def _record(self, cmd: Sequence[object], cwd: Optional[PurePath],
                env: Optional[Mapping[str, str]]) -> List[str]:
        argv = [str(c) for c in cmd]
        self.calls.append(Call(argv, str(cwd) if cwd else None, dict(env) if env is not None else None))
        return argv

    def run(self, cmd: Sequence[object], cwd: Optional[PurePath] = None,
            env: Optional[Mapping[str, str]] = None) -> int:
        argv = self._record(cmd, cwd, env)
        self.log(f"+ {_show(argv)}" + (f"    (in {cwd})" if cwd else ""))
        if self.dry_run:
            return 0
        try:
            return subprocess.run(argv, cwd=str(cwd) if cwd else None,
                                  env=dict(env) if env is not None else None, check=False).returncode
        except OSError as exc:
            self.log(f"error: could not start {argv[0]}: {exc}")
            return 127

    def capture(self, cmd: Sequence[object], cwd: Optional[PurePath] = None,
                env: Optional[Mapping[str, str]] = None) -> Optional[str]:
        """stdout of a read-only query; None in a dry run or when it fails."""
        argv = self._record(cmd, cwd, env)
        if self.dry_run:
            self.log(f"+ {_show(argv)}")
            return None
        try:
            proc = subprocess.run(argv, cwd=str(cwd) if cwd else None, capture_output=True,
                                  env=dict(env) if env is not None else None, check=False)
        except OSError:
            return None
        if proc.returncode != 0:
            return None
        return proc.stdout.decode("utf-8", "replace")


@dataclass
class Host:
    """Path conventions of the OS the commands are for."""

    platform: str  # "linux" or "windows"

    def __post_init__(self) -> None:
        if self.platform not in ("linux", "windows"):
            raise ValueError(f"platform must be 'linux' or 'windows', got {self.platform!r}")

    @staticmethod
    def current() -> "Host":
        return Host("windows" if sys.platform.startswith("win") else "linux")

    @property
    def is_current(self) -> bool:
        return self == Host.current()

    def python(self) -> str:
        """The Python that creates venvs: this one, or a placeholder for another OS."""
        return sys.executable if self.is_current else ("python.exe" if self.platform == "windows"
                                                       else "python3")

    def path(self, *parts: object) -> PurePath:
        """A path for this OS; the real Path when it is the OS we run on."""
        cls = Path if self.is_current else (PureWindowsPath if self.platform == "windows"
                                            else PurePosixPath)
        return cls(*[str(p) for p in parts])

    def venv_python(self, venv: PurePath) -> PurePath:
        if self.platform == "windows":
            return self.path(venv, "Scripts", "python.exe")
        return self.path(venv, "bin", "python")

    def venv_scripts(self, venv: PurePath) -> PurePath:
        return self.path(venv, "Scripts" if self.platform == "windows" else "bin")


def child_env(extra: Optional[Mapping[str, str]] = None, path_prepend: Optional[PurePath] = None,
              host: Optional[Host] = None) -> dict:
    """The environment for a venv's commands: ours, without the leaky variables."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_VARS}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if path_prepend is not None:
        sep = ";" if (host or Host.current()).platform == "windows" else ":"
        env["PATH"] = str(path_prepend) + (sep + env["PATH"] if env.get("PATH") else "")
    env.update(extra or {})
    return env


class _Steps:
    def __init__(self, total: int, log: Callable[[str], None]):
        self.k = 0
        self.total = total
        self.log = log

    def __call__(self, title: str) -> None:
        self.k += 1
        self.log(f"[{self.k}/{self.total}] {title}")


# ----------------------------------------------------------------------------------
# Requirements
# ----------------------------------------------------------------------------------
def _build_requires_fallback(text: str) -> List[str]:
    """[build-system].requires without a TOML library (Python 3.9/3.10 without tomli):
    pyproject.toml keeps it as a plain array of strings, which is all this reads."""
    section = re.search(r"^\[build-system\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not section:
        return []
    array = re.search(r"^requires\s*=\s*\[(.*?)\]", section.group(1), re.M | re.S)
    if not array:
        return []
    body = re.sub(r"#[^\n]*", "", array.group(1))
    return [a or b for a, b in re.findall(r"\"([^\"]*)\"|'([^']*)'", body)]


def _build_requires(text: str) -> List[str]:
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib  # the backport, if present
        except ImportError:
            return _build_requires_fallback(text)
    return list(tomllib.loads(text).get("build-system", {}).get("requires", []))


def read_build_requires(root: Path = REPO_ROOT) -> List[str]:
    requires = _build_requires((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))
    if not requires:
        raise WorkflowError(f"{Path(root) / 'pyproject.toml'} has no [build-system] requires list")
    return list(requires)


def _requirement_name(spec: str) -> str:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not m:
        raise ValueError(f"requirement {spec!r} does not start with a package name")
    return m.group(1)


def read_requirements(path: Path) -> List[str]:
    """Requirement lines of a requirements file (comments and blanks dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def default_torch_spec() -> tuple:
    """(requirement, index URL or None) for the smoke venv's torch: the torch of the
    Python running this (its CUDA flavour kept via the PyTorch index), else 2.13.0."""
    try:
        from importlib import metadata
        version = metadata.version("torch")
    except Exception:  # noqa: BLE001 - not installed (PackageNotFoundError) or broken metadata
        return DEFAULT_TORCH, None
    public, _, local = version.partition("+")
    if re.fullmatch(r"cu\d+|rocm[\d.]+", local or ""):
        return f"torch=={public}", PYTORCH_INDEX.format(tag=local)
    return f"torch=={public}", None


def newest_wheel(dist: Path) -> Optional[Path]:
    wheels = sorted(Path(dist).glob("flash_mla-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


# ----------------------------------------------------------------------------------
# Workflows
# ----------------------------------------------------------------------------------
def _make_venv(runner: Runner, host: Host, venv: PurePath, fresh: bool) -> PurePath:
    python = host.venv_python(venv)
    exists = host.is_current and Path(python).is_file()
    if fresh or not exists:
        cmd = [host.python(), "-m", "venv"] + (["--clear"] if fresh else [])
        if runner.run(cmd + [venv]) != 0:
            raise WorkflowError(f"could not create the virtual environment {venv}; on Debian/Ubuntu "
                                "install python3-venv")
    else:
        runner.log(f"    using the existing venv {venv} (--fresh recreates it)")
    return python


def _cuda_installed() -> bool:
    try:
        from . import toolchain as T
        T.find_cuda()
        return True
    except Exception:  # noqa: BLE001 - ToolchainError, or a broken nvcc: either way "no"
        return False


def _local_cuobjdump() -> str:
    try:
        from . import toolchain as T
        return T.find_cuobjdump() or ""
    except Exception:  # noqa: BLE001 - a broken toolchain means "none"; the check says so
        return ""


def _expected_targets(archs: Optional[str]) -> List[str]:
    """The targets this build compiles (as setup.py will resolve them), for the wheel
    check's --require; empty when they cannot be known here (no nvcc in this Python)."""
    try:
        from . import archs as A
        from . import toolchain as T
        version = T.find_cuda().version
        request = archs or os.environ.get("FLASH_MLA_CUDA_ARCHS") or "all"
        return [t.name for t in A.select_targets(request, version)]
    except Exception:  # noqa: BLE001 - ToolchainError/ArchError: check-env already reported it
        return []


def _pypi_cuda_spec() -> str:
    from . import toolchain as T
    m = re.search(r"\"([^\"]+)\"", T.PYPI_CUDA_HINT)
    return m.group(1) if m else "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]==13.*"


def _resolve(host: Host, root: PurePath, value: Optional[str], default: str) -> PurePath:
    """A user-given path (relative to where the user is), else root/default."""
    if not value:
        return host.path(root, default)
    if host.is_current:
        return Path(value).resolve()
    given = host.path(value)
    return given if given.is_absolute() else host.path(root, value)


def _probe_missing(runner: Runner, python: PurePath, names: Sequence[str], env: Mapping[str, str]) -> Optional[List[str]]:
    """Which of the distributions ``names`` ``python`` lacks; None in a dry run or when it
    cannot run."""
    out = runner.capture([python, "-c", _PROBE, *names], env=env)
    if out is None:
        return None
    return json.loads(out.strip().splitlines()[-1])


def _cuobjdump(runner: Runner, python: PurePath, root: PurePath, env: Mapping[str, str],
               host: Host) -> str:
    """The cuobjdump the build venv finds, else this Python's (a CUDA Toolkit here), else
    "" (and "" in a dry run for another OS)."""
    probe = runner.capture([python, "-c", "from flash_mla_build import toolchain as T; "
                            "print(T.find_cuobjdump() or '')"], cwd=root, env=env)
    return (probe or "").strip() or (_local_cuobjdump() if host.is_current else "")


def _cuobjdump_spec(runner: Runner, python: PurePath, root: PurePath, env: Mapping[str, str],
                    host: Host) -> Optional[str]:
    """NVIDIA's cuobjdump wheel for the build venv when neither it nor this Python has a
    cuobjdump, so that the wheel check always runs; None when one exists."""
    if _cuobjdump(runner, python, root, env, host):
        return None
    major = _nvcc_major() or 13
    return f"{CUOBJDUMP_WHEEL}=={major}.*"


def _nvcc_major() -> Optional[int]:
    try:
        from . import toolchain as T
        return int(T.find_cuda().version[0])
    except Exception:  # noqa: BLE001 - no nvcc here: the PyPI toolkit's major is used
        return None


def build(args: argparse.Namespace, runner: Runner, host: Host, root: PurePath = REPO_ROOT) -> int:
    install = not args.no_smoke
    steps = _Steps(8 if install else 6, runner.log)
    venv = _resolve(host, root, args.venv, BUILD_VENV)

    steps("preflight (Python, long paths, developer shell; before anything is installed)")
    # The Python that runs this, with nothing installed yet: a venv under a long path
    # on Windows fails in pip's first install (CUTLASS's deepest header path), so the
    # long-path rule is checked here, against the venv path that will be used.
    if runner.run([host.python(), "-m", "flash_mla_build", "check-env", "--preflight",
                   "--venv", venv], cwd=root, env=child_env(host=host)) != 0:
        raise WorkflowError("the preflight check reported blockers: apply the fixes printed "
                            "above, then run the build again")

    steps(f"virtual environment for the build {venv}")
    python = _make_venv(runner, host, venv, args.fresh)
    build_env = {"FLASH_MLA_CUDA_ARCHS": args.archs} if args.archs else {}

    steps("build requirements (pyproject.toml [build-system])")
    requires = read_build_requires(Path(root) if host.is_current else REPO_ROOT)
    want_pypi = args.cuda_from_pypi == "always" or (
        args.cuda_from_pypi == "auto" and not _cuda_installed())
    if want_pypi:
        why = "asked for" if args.cuda_from_pypi == "always" else "no CUDA toolkit found"
        runner.log(f"    {why}: installing nvcc from PyPI into the venv and building with it")
        requires.append(_pypi_cuda_spec())
        build_env["FLASH_MLA_CUDA_FROM_PYPI"] = "1"
    env = child_env(build_env, host=host)
    cuobjdump = _cuobjdump_spec(runner, python, root, env, host)
    if cuobjdump and not runner.dry_run:
        runner.log(f"    no cuobjdump found: installing {cuobjdump} for the wheel check")
        requires.append(cuobjdump)
    if runner.run([python, "-m", "pip", "install", *requires], env=env) != 0:
        raise WorkflowError("installing the build requirements failed (see pip's message above)")

    steps("environment check")
    if runner.run([python, "-m", "flash_mla_build", "check-env"], cwd=root, env=env) != 0:
        raise WorkflowError("check-env reported blockers: apply the fixes printed above, then "
                            "run the build again")

    steps("wheel (pip wheel, ninja progress below)")
    dist = host.path(root, "dist")
    if runner.run([python, "-m", "pip", "wheel", ".", "-w", "dist", "--no-deps",
                   "--no-build-isolation", "-v"], cwd=root, env=env) != 0:
        raise WorkflowError("the wheel build failed; BUILD_WINDOWS.md's troubleshooting table "
                            "lists the usual compiler errors and their fixes")
    wheel = newest_wheel(Path(dist)) if not runner.dry_run else host.path(dist, "flash_mla-<version>-py3-none-<platform>.whl")
    if wheel is None:
        raise WorkflowError(f"pip reported success but {dist} holds no flash_mla-*.whl")
    runner.log(f"    wheel: {wheel}")

    steps("wheel check (cubins, registers, spills, shared memory)")
    tool = _cuobjdump(runner, python, root, env, host)
    if runner.dry_run or tool:
        verify = [python, "-m", "flash_mla_build.wheel_verify", wheel]
        verify += ["--cuobjdump", tool] if tool else []
        for target in _expected_targets(args.archs) if host.is_current else []:
            verify += ["--require", target]
        if runner.run(verify, cwd=root, env=env) != 0:
            raise WorkflowError(f"the wheel check failed for {wheel} (see above)")
    else:
        runner.log("    skipped, NOT verified: no cuobjdump found, and installing "
                   f"{CUOBJDUMP_WHEEL} did not provide one")

    if not install:
        return 0
    return install_and_smoke(args, runner, host, root, wheel, steps)


def _target_python(args: argparse.Namespace, runner: Runner, host: Host, root: PurePath,
                   steps: "_Steps") -> Tuple[PurePath, bool]:
    """(the Python to install the wheel into, whether it is a fresh venv)."""
    if getattr(args, "isolated", False):
        venv = _resolve(host, root, getattr(args, "smoke_venv", None), SMOKE_VENV)
        steps(f"install into a clean virtual environment {venv} (--isolated)")
        if runner.run([host.python(), "-m", "venv", "--clear", venv]) != 0:
            raise WorkflowError(f"could not create the virtual environment {venv}")
        return host.venv_python(venv), True
    python = host.path(host.python())
    steps(f"install into this Python ({python})")
    return python, False


def _install_torch_if_needed(args: argparse.Namespace, runner: Runner, host: Host,
                             python: PurePath, fresh: bool, env: Mapping[str, str]) -> None:
    given = bool(args.torch_spec)
    spec, index = (args.torch_spec, None) if given else default_torch_spec()
    if getattr(args, "torch_index_url", None):
        index = args.torch_index_url
    if not fresh and not given:
        missing = _probe_missing(runner, python, ["torch"], env)
        if missing == []:
            runner.log("    torch: keeping the torch this Python has (--torch-spec replaces it)")
            return
        if missing is None and not runner.dry_run:
            raise WorkflowError(f"{python} could not run; is it a working Python 3.9+?")
        spec = DEFAULT_TORCH
        runner.log(f"    torch: {'(dry run: assuming) ' if missing is None else ''}none in this "
                   f"Python, installing {spec}")
    if host.platform == "windows" and index is None:
        runner.log("    note: PyPI's torch for Windows is CPU-only, so the smoke test would not "
                   "reach the GPU kernels; install a CUDA torch first, or pass --torch-index-url "
                   "https://download.pytorch.org/whl/cu128 (a CUDA your driver supports) or "
                   "--torch-spec")
    cmd = [python, "-m", "pip", "install", spec]
    if index:
        # The PyTorch index carries the CUDA builds; PyPI stays for torch's dependencies.
        cmd += ["--index-url", index, "--extra-index-url", "https://pypi.org/simple"]
    if runner.run(cmd, env=env) != 0:
        raise WorkflowError(f"installing {spec} failed; pass --torch-spec (and --torch-index-url) "
                            "for the torch that matches your driver")


def install_and_smoke(args: argparse.Namespace, runner: Runner, host: Host, root: PurePath,
                      wheel: PurePath, steps: "_Steps") -> int:
    """Install ``wheel`` where the user is (the Python running this; with --isolated a
    fresh venv) and run ``python -m flash_mla.smoke`` there; its exit code is ours."""
    python, fresh = _target_python(args, runner, host, root, steps)
    env = child_env(host=host)
    _install_torch_if_needed(args, runner, host, python, fresh, env)
    # Same version as an installed flash_mla would be skipped: reinstall the package
    # alone, then let pip add what it needs (apache-tvm-ffi) without touching torch.
    if runner.run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", wheel],
                  env=env) != 0:
        raise WorkflowError(f"installing {wheel} into {python} failed (see pip's message above; "
                            "an externally managed system Python needs a venv or conda "
                            "environment, or pass --isolated)")
    if runner.run([python, "-m", "pip", "install", wheel], env=env) != 0:
        raise WorkflowError(f"installing the dependencies of {wheel} failed (see pip's message "
                            "above)")

    steps("python -m flash_mla.smoke")
    # Run from dist/, never the repository root, so `import flash_mla` finds the
    # installed wheel and not the source tree.
    code = runner.run([python, "-m", "flash_mla.smoke"], cwd=host.path(wheel).parent, env=env)
    if not runner.dry_run:
        runner.log(f"smoke test exit code: {code}")
    return code


def smoke(args: argparse.Namespace, runner: Runner, host: Host, root: PurePath = REPO_ROOT) -> int:
    if getattr(args, "wheel", None):
        wheel = _resolve(host, root, args.wheel, "")
    else:
        found = newest_wheel(Path(root) / "dist") if host.is_current else None
        if found is None and not runner.dry_run:
            raise WorkflowError(f"no flash_mla-*.whl in {host.path(root, 'dist')}: run the build "
                                "first (scripts/build.sh or scripts\\build.ps1)")
        wheel = found or host.path(root, "dist", "flash_mla-<version>-py3-none-<platform>.whl")
    return install_and_smoke(args, runner, host, root, wheel, _Steps(2, runner.log))


def test(args: argparse.Namespace, pytest_args: Sequence[str], runner: Runner, host: Host,
         root: PurePath = REPO_ROOT) -> int:
    steps = _Steps(2, runner.log)
    steps("test requirements (installed only when missing)")
    if args.venv:
        venv = _resolve(host, root, args.venv, "")
        python: PurePath = _make_venv(runner, host, venv, fresh=False)
        scripts = host.venv_scripts(venv)
    else:
        python = host.path(host.python())
        scripts = (host.path(sysconfig.get_path("scripts")) if host.is_current
                   else host.path("C:\\Python311\\Scripts" if host.platform == "windows"
                                  else "/usr/local/bin"))
    env = child_env(path_prepend=scripts, host=host)
    reqs_path = Path(root) / TEST_REQUIREMENTS if host.is_current else REPO_ROOT / TEST_REQUIREMENTS
    specs = read_requirements(reqs_path)
    torch_spec = os.environ.get("FLASH_MLA_TEST_TORCH") or DEFAULT_TORCH
    wanted = {_requirement_name(s): s for s in [torch_spec, *specs]}
    missing = _probe_missing(runner, python, list(wanted), env)
    if missing is None:
        if not runner.dry_run:
            raise WorkflowError(f"{python} could not run; is it a working Python 3.9+?")
        missing = list(wanted)
        runner.log("    (dry run: assuming every requirement is missing)")
    if missing:
        runner.log("    missing: " + ", ".join(missing))
        if _requirement_name(torch_spec) in missing:
            # Alone first: with torch==2.13.0 in place, the other packages' torch
            # requirements are satisfied instead of pulling a newer CUDA build.
            if runner.run([python, "-m", "pip", "install", torch_spec], env=env) != 0:
                raise WorkflowError(f"installing {torch_spec} failed; set FLASH_MLA_TEST_TORCH "
                                    "to a torch requirement that pip can install here")
        rest = [wanted[n] for n in missing if n != _requirement_name(torch_spec)]
        if rest and runner.run([python, "-m", "pip", "install", *rest], env=env) != 0:
            raise WorkflowError("installing the test requirements failed (see pip's message above)")
    else:
        runner.log("    all present")

    steps("pytest")
    # Test paths among the extra arguments (tests/x.py, tests\x.py::case) replace the
    # default "tests" folder; option values such as `-k lint` are not paths under tests.
    chosen = [a for a in pytest_args if a.replace("\\", "/").split("/")[0] == "tests"]
    targets = [] if chosen else ["tests"]
    return runner.run([python, "-m", "pytest", "-q", *targets, *pytest_args], cwd=root, env=env)


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the steps and commands without running them")
    parser.add_argument("--platform", choices=("linux", "windows"), default=None,
                        help="with --dry-run: show the command lines for this OS")


def _install_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--isolated", action="store_true",
                        help="install the wheel and run the smoke test in a fresh venv "
                        f"({SMOKE_VENV}) instead of the Python running this (what CI uses)")
    parser.add_argument("--torch-spec", default=None,
                        help="torch requirement to install (default: keep this Python's torch; "
                        f"where there is none, {DEFAULT_TORCH}; with --isolated, this "
                        "Python's torch version)")
    parser.add_argument("--torch-index-url", default=None,
                        help="package index for torch, e.g. https://download.pytorch.org/whl/cu128")
    parser.add_argument("--smoke-venv", default=None,
                        help=f"with --isolated: the venv folder (default {SMOKE_VENV})")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flash_mla_build")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the wheel into dist/, install it into this Python "
                       "and smoke-test it there")
    b.add_argument("--venv", default=None, help=f"build venv to use (default {BUILD_VENV}, "
                   "created when missing)")
    b.add_argument("--fresh", action="store_true", help="recreate the build venv")
    b.add_argument("--archs", default=None,
                   help="FLASH_MLA_CUDA_ARCHS for this build, e.g. '120f' or '80;90a;100f;120f' "
                   "(default: the environment's, else every target the nvcc supports)")
    b.add_argument("--cuda-from-pypi", choices=("auto", "always", "never"), default="auto",
                   help="install nvcc from PyPI into the build venv (auto: when none is installed)")
    b.add_argument("--no-smoke", action="store_true",
                   help="stop after building and checking (install nothing, no smoke test)")
    _install_options(b)
    _common(b)
    s = sub.add_parser("smoke", help="install the newest dist/ wheel into this Python (or, "
                       "with --isolated, a clean venv) and run python -m flash_mla.smoke")
    s.add_argument("--wheel", default=None, help="wheel to test (default: newest in dist/)")
    _install_options(s)
    _common(s)
    t = sub.add_parser("test", help="install missing test requirements and run pytest; extra "
                       "arguments go to pytest")
    t.add_argument("--venv", default=None, help="venv to install into and run from (default: "
                   "the current interpreter)")
    _common(t)
    return parser


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = _print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if argv and argv[0] == "test":
        args, extra = parser.parse_known_args(argv)
        if extra and extra[0] == "--":
            extra = extra[1:]
    else:
        args, extra = parser.parse_args(argv), []
    if args.platform and not args.dry_run:
        parser.error("--platform only goes with --dry-run (commands for another OS cannot run here)")
    host = Host(args.platform) if args.platform else Host.current()
    runner = Runner(dry_run=args.dry_run, log=log)
    root: PurePath = REPO_ROOT if host.is_current else host.path(
        "C:\\src\\flash_mla" if host.platform == "windows" else "/src/flash_mla")
    try:
        if args.command == "build":
            return build(args, runner, host, root)
        if args.command == "smoke":
            return smoke(args, runner, host, root)
        return test(args, extra, runner, host, root)
    except WorkflowError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        sys.stdout.flush()
