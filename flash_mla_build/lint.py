"""Portability lint: the source rules that keep csrc/ and flash_mla/ building with MSVC.

No Windows machine is available, so the things MSVC (and nvcc's MSVC-emulating front
end) rejects are caught here instead, by a scanner that strips comments and string
literals, tracks braces, parentheses and preprocessor conditionals, and knows which
function it is in. It is practical, not a C++ parser: it errs toward reporting.

Rules (the id printed on each finding):
  int128               ``__int128`` (MSVC has none, so nvcc's front end has none either)
  host-asm             inline asm in host-visible code (host or __host__ __device__
                       functions, namespace scope) outside ``#if defined(__CUDA_ARCH__)``
  gnu-attribute        ``__attribute__((...))``
  statement-expression ``({ ...; })``
  long-type            ``long`` / ``unsigned long`` (32 bits on Windows)
  posix-header         ``#include`` of a POSIX-only header
  if-in-macro-args     a preprocessor conditional inside the arguments of a macro call
  tensormap-align      a ``CUtensorMap`` struct member without ``alignas(64)``
  params-static-assert a struct in csrc/params.h without ``static_assert(sizeof(S) ...)``
  posix-import         flash_mla/*.py importing a POSIX-only module or calling a POSIX-only
                       ``os`` function outside a platform guard or ImportError handler

A line may opt out of one rule with a trailing comment ``// lint-allow(RULE): reason``
(``# lint-allow(RULE): reason`` in Python); the reason is for the reviewer.

Usage: ``python -m flash_mla_build lint [PATH ...]`` (default: csrc flash_mla).
Prints ``file:line: rule: message`` and exits 1 when anything is found.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

__all__ = ["Finding", "lint_cpp_text", "lint_python_text", "lint_paths", "main"]

CPP_SUFFIXES = (".h", ".hpp", ".cuh", ".cu", ".cpp", ".cc", ".cxx", ".inl")

POSIX_HEADERS = frozenset({
    "unistd.h", "fcntl.h", "sys/mman.h", "pthread.h", "dlfcn.h", "sys/time.h",
    "sys/ioctl.h", "sys/wait.h", "sys/resource.h", "sys/socket.h", "sys/syscall.h",
    "sys/utsname.h", "sys/select.h", "sys/uio.h", "netinet/in.h", "arpa/inet.h",
    "netdb.h", "poll.h", "sched.h", "semaphore.h", "strings.h", "termios.h",
    "execinfo.h", "cxxabi.h", "alloca.h", "endian.h", "byteswap.h", "dirent.h",
    "libgen.h", "glob.h", "pwd.h", "grp.h", "sys/signal.h",
})

POSIX_MODULES = frozenset({
    "fcntl", "termios", "tty", "pty", "resource", "pwd", "grp", "posix", "crypt",
    "spwd", "syslog", "nis", "curses", "readline", "posix_ipc",
})
POSIX_OS_FUNCTIONS = frozenset({
    "fork", "forkpty", "getuid", "geteuid", "getgid", "getegid", "setsid", "getpgid",
    "killpg", "uname", "getloadavg", "sysconf", "fsync_range", "mkfifo", "setuid",
    "chown", "lchown", "nice", "wait3", "wait4",
})

# Function-specifier spellings: CUDA keywords and the CUTLASS/CuTe macros for them.
DEVICE_ONLY_SPECIFIERS = frozenset({"__device__", "__global__", "CUTE_DEVICE", "CUTLASS_DEVICE",
                                    "CUTLASS_GLOBAL"})
HOST_SPECIFIERS = frozenset({"__host__", "CUTE_HOST_DEVICE", "CUTLASS_HOST_DEVICE", "CUTE_HOST",
                             "CUTLASS_HOST"})
# Macros whose device branch is removed by the preprocessor in the host pass.
DEVICE_TARGET_MACROS = frozenset({"NV_IF_TARGET", "NV_IF_ELSE_TARGET", "NV_DISPATCH_TARGET"})
# Macros that, like __CUDA_ARCH__, are only defined in the device compilation pass.
# CuTe's *_ACTIVATED and CUTLASS's ARCH_MMA_*_ENABLED are; CuTe's CUTE_ARCH_*_ENABLED
# are not all (CUTE_ARCH_LDSM_SM75_ENABLED holds on the host), so they do not count.
_DEVICE_PASS_MACRO_RE = re.compile(
    r"__CUDA_ARCH__|__CUDA_ARCH_FEAT_\w+|__CUDA_ARCH_SPECIFIC__|__CUDA_ARCH_FAMILY_SPECIFIC__"
    r"|CUTE_ARCH_\w+_ACTIVATED|CUTLASS_ARCH_MMA_\w+_ENABLED")

_ALLOW_RE = re.compile(r"lint-allow\(([\w-]+)\)")
_MACRO_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_CONTROL_KEYWORDS = frozenset({"if", "for", "while", "switch", "else", "do", "try", "catch",
                               "case", "default"})
_TYPE_KEYWORDS = frozenset({"struct", "class", "union", "enum"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.message}"


# ----------------------------------------------------------------------------------
# Tokenizer: comments and literals never reach the rules; preprocessor lines become
# one 'directive' token each (backslash continuations joined).
# ----------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"""
   (?P<nl>\n)
  |(?P<ws>[ \t\f\v\r]+)
  |(?P<lcomment>//[^\n]*)
  |(?P<bcomment>/\*.*?(?:\*/|\Z))
  |(?P<rawstr>(?:u8|u|U|L)?R"(?P<delim>[^()\\\s"]{0,16})\(.*?\)(?P=delim)")
  |(?P<str>(?:u8|u|U|L)?"(?:\\.|[^"\\\n])*"?)
  |(?P<chr>(?:u8|u|U|L)?'(?:\\.|[^'\\\n])+'?)
  |(?P<ident>[A-Za-z_]\w*)
  |(?P<num>\.?\d(?:[eEpP][+-]|[\w.'])*)
  |(?P<punct>::|->|\#\#|<<=|>>=|<<|>>|<=|>=|==|!=|&&|\|\||\+\+|--|[-+*/%&|^!~=<>?:;,.(){}\[\]\#\\])
  |(?P<other>.)
""", re.X | re.S)


@dataclass
class Token:
    kind: str  # ident, num, punct, str, directive
    text: str
    line: int


def tokenize(text: str) -> tuple:
    """Return (tokens, allow) where allow maps line -> set of rule ids opted out."""
    tokens: List[Token] = []
    allow: dict = {}
    line = 1
    at_line_start = True
    directive: Optional[List[str]] = None
    directive_line = 0
    pending_backslash = False
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        value = m.group(0)
        if kind in ("lcomment", "bcomment"):
            for rule in _ALLOW_RE.findall(value):
                allow.setdefault(line, set()).add(rule)
            line += value.count("\n")
            continue
        if kind == "ws":
            continue
        if kind == "nl":
            line += 1
            if directive is not None and not pending_backslash:
                tokens.append(Token("directive", " ".join(directive), directive_line))
                directive = None
            pending_backslash = False
            if directive is None:
                at_line_start = True
            continue
        if kind == "rawstr":
            line_after = line + value.count("\n")
            kind, value = "str", '""'
        else:
            line_after = line
        if directive is not None:
            pending_backslash = value == "\\"
            if not pending_backslash:
                directive.append(value)
            line = line_after
            continue
        if at_line_start and value == "#":
            directive = []
            directive_line = line
            at_line_start = False
            continue
        at_line_start = False
        if kind in ("str", "chr"):
            value = '""' if kind == "str" else "''"
            kind = "str"
        tokens.append(Token("punct" if kind in ("punct", "other") else kind, value, line))
        line = line_after
    if directive is not None:
        tokens.append(Token("directive", " ".join(directive), directive_line))
    return tokens, allow


# ----------------------------------------------------------------------------------
# The scanner
# ----------------------------------------------------------------------------------
@dataclass
class _Brace:
    kind: str          # namespace, struct, function, block
    device: bool       # code here only exists in the device pass
    name: str = ""
    line: int = 0
    parens: list = field(default_factory=list)  # open '(' in this brace: callee names


@dataclass
class _Cond:
    device: bool            # current branch is device-pass only
    else_device: bool       # what an #else branch would be


def _directive_device_kind(expr: str) -> Optional[bool]:
    """True: the condition holds only in the device pass; False: only in the host pass
    (a negated __CUDA_ARCH__ test); None: unrelated to the pass."""
    if not _DEVICE_PASS_MACRO_RE.search(expr):
        return None
    compact = re.sub(r"\s+", "", expr)
    negated = re.search(r"!\(*(?:defined\(*)?(?:" + _DEVICE_PASS_MACRO_RE.pattern + r")", compact)
    if negated:
        return False if "||" not in compact else None
    if "||" in compact:
        return None
    return True


def _classify_head(head: Sequence[Token], enclosing_device: bool) -> tuple:
    """Kind, device flag and name of the brace that follows these tokens."""
    texts = [t.text for t in head]
    if not texts:
        return "block", enclosing_device, ""
    if texts[0] == "namespace" or (texts[0] == "extern" and len(texts) > 1 and texts[1] == '""'):
        return "namespace", False, texts[1] if len(texts) > 1 else ""
    if texts[-1] in ("=", ",", "(", "return", "[", "{", "?", ":") or texts[0] in _CONTROL_KEYWORDS:
        return "block", enclosing_device, ""
    marked_device = any(t in DEVICE_ONLY_SPECIFIERS for t in texts)
    marked_host = any(t in HOST_SPECIFIERS for t in texts)
    # A lambda: '[' that is not a subscript and not an attribute '[['.
    for i, t in enumerate(texts):
        if t == "[" and (i == 0 or texts[i - 1] in ("=", "(", ",", "return", "{", ";", "?", ":")) \
                and (i + 1 >= len(texts) or texts[i + 1] != "["):
            if marked_device and not marked_host:
                return "function", True, "lambda"
            if marked_host:
                return "function", False, "lambda"
            return "function", enclosing_device, "lambda"
    depth_angle = 0
    depth_paren = 0
    first_paren = None
    type_name = ""
    type_keyword = ""
    for i, t in enumerate(texts):
        if t == "(":
            if depth_paren == 0 and first_paren is None:
                first_paren = i
            depth_paren += 1
        elif t == ")":
            depth_paren -= 1
        elif depth_paren == 0:
            if t == "<":
                depth_angle += 1
            elif t == ">":
                depth_angle = max(0, depth_angle - 1)
            elif t == ">>":
                depth_angle = max(0, depth_angle - 2)
            elif t in _TYPE_KEYWORDS and depth_angle == 0 and not type_name and first_paren is None:
                names = [x for x in texts[i + 1:] if re.match(r"^[A-Za-z_]\w*$", x)
                         and x not in ("class", "alignas", "final")]
                type_name = names[0] if names else "<anonymous>"
                type_keyword = t
    if type_name:
        # Enumerator lists hold no members; everything else is a class body.
        return ("enum" if type_keyword == "enum" else "struct"), enclosing_device, type_name
    if first_paren is not None:
        name = ""
        # The declarator's name: the identifier before the last top-level '('.
        depth = 0
        last_open = first_paren
        for i, t in enumerate(texts):
            if t == "(":
                if depth == 0:
                    last_open = i
                depth += 1
            elif t == ")":
                depth -= 1
        for j in range(last_open - 1, -1, -1):
            if re.match(r"^[A-Za-z_]\w*$", texts[j]):
                name = texts[j]
                break
        device = marked_device and not marked_host
        return "function", device, name
    return "block", enclosing_device, ""


class _Scanner:
    def __init__(self, path: str, text: str):
        self.path = path
        self.tokens, self.allow = tokenize(text)
        self.findings: List[Finding] = []
        self.braces: List[_Brace] = [_Brace("namespace", False)]
        self.conds: List[_Cond] = []
        self.head: List[Token] = []
        self.structs: List[tuple] = []   # (name, line, kind of the enclosing brace)
        self.static_asserted: set = set()

    def report(self, line: int, rule: str, message: str) -> None:
        if rule in self.allow.get(line, ()):
            return
        self.findings.append(Finding(self.path, line, rule, message))

    # -- context -------------------------------------------------------------------
    def _device_pass_only(self) -> bool:
        if any(c.device for c in self.conds):
            return True
        for brace in reversed(self.braces):
            if any(name in DEVICE_TARGET_MACROS for name in brace.parens):
                return True
            if brace.kind == "function":
                return brace.device
            if brace.kind in ("namespace", "struct"):
                return False
        return False

    def _function_name(self) -> str:
        for brace in reversed(self.braces):
            if brace.kind == "function":
                return brace.name
        return ""

    def _enclosing_device(self) -> bool:
        for brace in reversed(self.braces):
            if brace.kind == "function":
                return brace.device
            if brace.kind in ("namespace", "struct"):
                return False
        return False

    # -- directives ----------------------------------------------------------------
    def directive(self, tok: Token) -> None:
        text = tok.text
        m = re.match(r"^(\w+)\s*(.*)$", text)
        if not m:
            return
        name, rest = m.group(1), m.group(2)
        if name == "include":
            header = re.sub(r"\s+", "", rest).strip('<>"')
            if header in POSIX_HEADERS:
                self.report(tok.line, "posix-header",
                            f"#include <{header}> is POSIX-only and does not exist under MSVC; "
                            "use the C++ standard library or guard it with #ifndef _WIN32")
            return
        if name in ("if", "ifdef", "ifndef", "elif", "else", "endif"):
            macro = next((n for b in self.braces for n in b.parens if _MACRO_NAME_RE.match(n)), None)
            if macro:
                self.report(tok.line, "if-in-macro-args",
                            f"#{name} inside the arguments of macro {macro}(...): undefined "
                            "behaviour that MSVC's preprocessor rejects; pick the variant outside "
                            "the macro call")
        if name in ("if", "ifdef", "ifndef"):
            if name == "if":
                kind = _directive_device_kind(rest)
            elif _DEVICE_PASS_MACRO_RE.fullmatch(rest.strip()):
                kind = name == "ifdef"
            else:
                kind = None
            self.conds.append(_Cond(device=kind is True, else_device=kind is False))
        elif name == "elif" and self.conds:
            kind = _directive_device_kind(rest)
            self.conds[-1] = _Cond(device=kind is True, else_device=False)
        elif name == "else" and self.conds:
            self.conds[-1] = _Cond(device=self.conds[-1].else_device, else_device=False)
        elif name == "endif" and self.conds:
            self.conds.pop()

    # -- code ----------------------------------------------------------------------
    def _next_code(self, i: int) -> Optional[Token]:
        for tok in self.tokens[i + 1:]:
            if tok.kind != "directive":
                return tok
        return None

    def _prev_code(self, i: int) -> Optional[Token]:
        for tok in reversed(self.tokens[:i]):
            if tok.kind != "directive":
                return tok
        return None

    def _is_statement_expression(self, i: int) -> bool:
        """tokens[i] is '{' right after '(': a statement expression has a ';' inside."""
        depth = 0
        for tok in self.tokens[i:]:
            if tok.kind == "directive":
                continue
            if tok.text == "{":
                depth += 1
            elif tok.text == "}":
                depth -= 1
                if depth == 0:
                    return False
            elif tok.text == ";" and depth == 1:
                return True
        return False

    def _check_member(self, stmt: Sequence[Token]) -> None:
        texts = [t.text for t in stmt]
        if "CUtensorMap" not in texts or texts[0] in ("using", "typedef", "friend", "static"):
            return
        idx = texts.index("CUtensorMap")
        after = texts[idx + 1] if idx + 1 < len(texts) else ""
        if not re.match(r"^[A-Za-z_]\w*$", after) or "(" in texts[:idx]:
            return  # a pointer, reference or function declaration
        compact = "".join(texts)
        if "alignas(64)" not in compact:
            self.report(stmt[idx].line, "tensormap-align",
                        f"CUtensorMap member {after!r} needs alignas(64): CUDA 13.0-13.2 declare "
                        "the type 128-byte aligned, which MSVC cannot pass by value (C2719)")

    def run(self) -> List[Finding]:
        tokens = self.tokens
        for i, tok in enumerate(tokens):
            if tok.kind == "directive":
                self.directive(tok)
                continue
            text = tok.text
            brace = self.braces[-1]
            if tok.kind == "ident":
                self._ident(i, tok)
            if text == "{":
                prev = self._prev_code(i)
                if prev is not None and prev.text == "(" and self._is_statement_expression(i):
                    self.report(tok.line, "statement-expression",
                                "GNU statement expression '({ ... })' is not C++ and MSVC rejects "
                                "it; use a lambda or an inline function")
                kind, device, name = _classify_head(self.head, self._enclosing_device())
                if kind == "struct":
                    self.structs.append((name, tok.line, brace.kind))
                self.braces.append(_Brace(kind, device, name, tok.line))
                self.head = []
                continue
            if text == "}":
                if len(self.braces) > 1:
                    self.braces.pop()
                self.head = []
                continue
            if text == "(":
                prev = self._prev_code(i)
                brace.parens.append(prev.text if prev is not None and prev.kind == "ident" else "")
            elif text == ")":
                if brace.parens:
                    brace.parens.pop()
            elif text == ";" and not brace.parens:
                if brace.kind == "struct":
                    self._check_member(self.head)
                self.head = []
                continue
            self.head.append(tok)
        return self.findings

    def _ident(self, i: int, tok: Token) -> None:
        text = tok.text
        if text in ("__int128", "__int128_t", "__uint128_t"):
            self.report(tok.line, "int128",
                        f"{text} does not exist under MSVC (nor in nvcc's front end there); move "
                        "16 bytes with uint4 or cute::uint128_t")
        elif text in ("__attribute__", "__attribute"):
            self.report(tok.line, "gnu-attribute",
                        "GNU __attribute__((...)) is rejected by MSVC; use __forceinline__, "
                        "alignas(...) or a standard [[attribute]]")
        elif text == "long":
            prev = self._prev_code(i)
            nxt = self._next_code(i)
            if not (prev is not None and prev.text == "long") and not (
                    nxt is not None and nxt.text in ("long", "double")):
                spelled = "unsigned long" if prev is not None and prev.text == "unsigned" else "long"
                self.report(tok.line, "long-type",
                            f"'{spelled}' is 32 bits on Windows and 64 on Linux; use int64_t "
                            "(or uint64_t / int32_t) for sizes, strides and offsets")
        elif text in ("asm", "__asm__", "__asm"):
            if not self._device_pass_only():
                where = self._function_name()
                place = (f"function {where!r}, which is host-visible (host or __host__ __device__)"
                         if where else "host-visible code")
                self.report(tok.line, "host-asm",
                            f"inline asm in {place}; MSVC x64 rejects it: move it into a "
                            "__device__-only function or under #if defined(__CUDA_ARCH__)")
        elif text == "static_assert":
            window = [t.text for t in self.tokens[i:i + 8]]
            if len(window) > 4 and window[1] == "(" and window[2] == "sizeof" and window[3] == "(":
                names = []
                for t in self.tokens[i + 4:i + 12]:
                    if t.text == ")":
                        break
                    names.append(t.text)
                if names:
                    self.static_asserted.add(names[-1])

    def missing_static_asserts(self) -> List[Finding]:
        found = []
        for name, line, parent in self.structs:
            # Structs nested in other structs are members, not kernel parameter structs.
            if parent != "namespace" or name == "<anonymous>":
                continue
            if name not in self.static_asserted:
                found.append(Finding(
                    self.path, line, "params-static-assert",
                    f"struct {name} has no static_assert(sizeof({name}) == N): kernel parameter "
                    "structs must pin their size so host (MSVC) and device layouts cannot differ"))
        return found


def lint_cpp_text(path: str, text: str, params_header: bool = False) -> List[Finding]:
    """Lint one C++/CUDA source. params_header: also require a sizeof static_assert for
    every struct at namespace scope (the rule for csrc/params.h)."""
    scanner = _Scanner(path, text)
    findings = scanner.run()
    if params_header:
        for finding in scanner.missing_static_asserts():
            if finding.rule not in scanner.allow.get(finding.line, ()):
                findings.append(finding)
    return sorted(findings, key=lambda f: (f.line, f.rule))


# ----------------------------------------------------------------------------------
# Python: POSIX-only modules and os functions outside a guard
# ----------------------------------------------------------------------------------
def _is_guard(node: ast.AST) -> bool:
    if isinstance(node, ast.If):
        for n in ast.walk(node.test):
            if isinstance(n, ast.Attribute) and n.attr in ("platform", "name", "system"):
                return True
            if isinstance(n, ast.Constant) and n.value in ("win32", "nt", "posix", "Windows",
                                                           "Linux", "linux"):
                return True
        return False
    if isinstance(node, ast.Try):
        for handler in node.handlers:
            names = []
            if handler.type is None:
                return True
            for n in ast.walk(handler.type):
                if isinstance(n, ast.Name):
                    names.append(n.id)
            if any(n in ("ImportError", "ModuleNotFoundError", "AttributeError", "OSError",
                         "Exception") for n in names):
                return True
    return False


def lint_python_text(path: str, text: str) -> List[Finding]:
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        return [Finding(path, exc.lineno or 1, "syntax", f"cannot parse: {exc.msg}")]
    allow: dict = {}
    for number, line in enumerate(text.splitlines(), start=1):
        for rule in _ALLOW_RE.findall(line):
            allow.setdefault(number, set()).add(rule)
    findings: List[Finding] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        guarded = guarded or _is_guard(node)
        hit = None
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in POSIX_MODULES]
            hit = bad[0] if bad else None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in POSIX_MODULES:
                hit = node.module
        if hit and not guarded:
            message = (f"module {hit!r} does not exist on Windows; guard the import "
                       "(try/except ImportError or a sys.platform check) or avoid it")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "os" and node.attr in POSIX_OS_FUNCTIONS and not guarded):
            hit = f"os.{node.attr}"
            message = f"{hit} does not exist on Windows; guard it with a sys.platform check"
        else:
            hit = None
        if hit and "posix-import" not in allow.get(node.lineno, ()):
            findings.append(Finding(path, node.lineno, "posix-import", message))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return findings


# ----------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------
def _iter_files(path: Path) -> Iterable[Path]:
    if path.is_file():
        yield path
        return
    for child in sorted(path.rglob("*")):
        if child.is_file() and (child.suffix in CPP_SUFFIXES or child.suffix == ".py"):
            if "__pycache__" not in child.parts:
                yield child


def _display(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def lint_paths(paths: Sequence[Path], base: Optional[Path] = None) -> List[Finding]:
    """Lint every C++/CUDA and Python file under the given files or folders."""
    base = base or Path.cwd()
    findings: List[Finding] = []
    for root in paths:
        if not root.exists():
            raise ValueError(f"lint path {str(root)!r} does not exist")
        for file in _iter_files(root):
            shown = _display(file, base)
            text = file.read_text(encoding="utf-8", errors="replace")
            if file.suffix == ".py":
                findings.extend(lint_python_text(shown, text))
            elif file.suffix in CPP_SUFFIXES:
                is_params = file.name == "params.h" and file.parent.name == "csrc"
                findings.extend(lint_cpp_text(shown, text, params_header=is_params))
    return findings


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flash_mla_build lint",
        description="Portability lint for Windows/MSVC over csrc/ and flash_mla/.")
    parser.add_argument("paths", nargs="*", help="files or folders (default: csrc flash_mla "
                        "of the repository)")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    paths = [Path(p) for p in args.paths] or [repo / "csrc", repo / "flash_mla"]
    base = Path.cwd() if args.paths else repo
    findings = lint_paths(paths, base=base)
    for finding in findings:
        print(finding)
    count = len(findings)
    print(f"lint: {count} finding{'s' if count != 1 else ''} in "
          f"{', '.join(_display(p, base) for p in paths)}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
