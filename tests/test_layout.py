"""The package tree shows the architecture: only the API, CLI and errors at the root, no import cycles between
mergelib modules (function-level imports included), and a README file map that lists every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mergelib"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imported(path: Path) -> set[str]:
    """mergelib modules `path` imports anywhere in its body: `from pkg import mod` counts as an import of `pkg.mod`
    alone when that is a module (the package is already being imported then), else of `pkg`."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [*subs, *([node.module] if not all(s in MODULES for s in subs) else [])]
        else:
            continue
        out |= {n for n in names if n in MODULES}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_package_root_holds_only_the_api_cli_and_errors():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert root == ["__init__.py", "__main__.py", "cli.py", "errors.py"]


def test_no_import_cycles():
    assert len(MODULES) > 80
    graph = {name: imported(path) - {name} for name, path in MODULES.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_readme_file_map_is_current_and_lists_every_module():
    proc = subprocess.run([sys.executable, "tools/file_map.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    readme = (REPO / "README.md").read_text()
    for path in [*MODULES.values(), *(REPO / "stages").glob("*.py")]:
        rel = path.relative_to(REPO)
        shown = f"{rel.parent}/" if path.name == "__init__.py" else str(rel)
        assert f"| `{shown}` |" in readme, f"README file map misses {shown}"


def test_readme_figures_are_rendered_from_the_recorded_measurements():
    """Every measured table of the README sits in a figures block equal to what docs/figures/<name>.json renders
    (tools/readme_figures.py), so a number cannot be edited by hand or go stale against its record."""
    proc = subprocess.run([sys.executable, "tools/readme_figures.py", "--check"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "tools" / "readme_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    readme = (REPO / "README.md").read_text()
    blocks = {m["name"]: m["body"] for m in tool.BLOCK.finditer(readme)}
    assert readme.count("<!-- figures:") == len(blocks)  # every block is one the tool renders
    assert set(blocks) == {p.stem for p in (REPO / "docs" / "figures").glob("*.json")} and len(blocks) >= 4
    assert all(body.strip() for body in blocks.values())
