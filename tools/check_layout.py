"""Checks the repository's structural rules (run by ``make lint`` and by tests/layout).

- src/: the top-level modules form an acyclic graph; ``unsafe`` appears only under src/cpu/; no
  source file is longer than MAX_LINES; every module folder opens (mod.rs) with a ``//!`` paragraph
  saying what it owns; no process-wide switch (a static atomic) steers the fast paths.
- python/: one copy of the user's yaml (the package data); the native module has a stub; the shells
  reach the native forward through the one dispatcher.
- tests/: test files live in area folders, not at the top.

Prints one line per violation and exits 1 when there is any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 600
UNSAFE_HOME = "cpu"


def top_modules() -> dict[str, list[Path]]:
    """Top-level module name -> its files."""
    modules: dict[str, list[Path]] = {}
    for path in SRC.iterdir():
        if path.is_dir():
            modules[path.name] = sorted(path.rglob("*.rs"))
        elif path.suffix == ".rs" and path.name != "lib.rs":
            modules[path.stem] = [path]
    return modules


def dependencies(modules: dict[str, list[Path]]) -> dict[str, set[str]]:
    graph = {}
    for name, files in modules.items():
        text = "\n".join(f.read_text() for f in files)
        used = set(re.findall(r"\bcrate::(\w+)", text))
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            used |= {part.strip().split("::")[0] for part in group.split(",") if part.strip()}
        graph[name] = (used & set(modules)) - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def check() -> list[str]:
    problems = []
    modules = top_modules()
    if found := cycle(dependencies(modules)):
        problems.append(f"src: module cycle {' -> '.join(found)}")
    for path in sorted(SRC.rglob("*.rs")):
        rel = path.relative_to(SRC)
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES:
            problems.append(f"src/{rel}: {lines} lines (more than {MAX_LINES})")
        if rel.parts[0] != UNSAFE_HOME and re.search(r"\bunsafe\b", re.sub(r"//.*", "", text)):
            problems.append(f"src/{rel}: `unsafe` outside src/{UNSAFE_HOME}/")
        if re.search(r"\bstatic\s+\w+\s*:\s*Atomic(Bool|U8|Usize)\b", text) and "GUARDED" not in text:
            problems.append(f"src/{rel}: a process-wide atomic switch")
    for folder in sorted(p for p in SRC.rglob("*") if p.is_dir()):
        mod = folder / "mod.rs"
        if not mod.exists() or not mod.read_text().startswith("//!"):
            problems.append(f"src/{folder.relative_to(SRC)}/: no mod.rs opening with a //! paragraph")
    if not (SRC / "lib.rs").read_text().startswith("//!"):
        problems.append("src/lib.rs: no //! crate map")
    package = ROOT / "python" / "mobileone_rs"
    yamls = [
        p
        for p in ROOT.rglob("yolov9-c-mobileone.yaml")
        if not any(part.startswith(".") or part in ("target", "dist") for part in p.relative_to(ROOT).parts)
    ]
    if yamls != [package / "data" / "yolov9-c-mobileone.yaml"]:
        problems.append(f"user's yaml: expected one copy in the package data, found {yamls}")
    if not (package / "_native.pyi").exists() or not (package / "py.typed").exists():
        problems.append("python: _native.pyi or py.typed missing")
    shells = (package / "modules.py").read_text()
    if "_native.plan(" not in shells:
        problems.append("python/modules.py: the block forward does not go through _native.plan")
    for path in sorted(package.rglob("*.py")):
        if path.name != "probes.py" and "torch._C" in path.read_text():
            problems.append(f"python/{path.relative_to(package)}: touches torch._C (only probes.py may)")
    stray = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    if stray:
        problems.append(f"tests/: test files outside area folders: {stray}")
    return problems


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
