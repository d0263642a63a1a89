"""The README's file map, generated from each module's docstring (its first sentence, whole): `python
tools/file_map.py` rewrites the block between the file-map markers in README.md; `--check` exits 1 when it is stale.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- file-map:start -->", "<!-- file-map:end -->"
CODE_DIRS = ("mergelib", "stages", "benchmarks", "tools")
FILES = {  # paths that are not Python modules, in the order shown
    "Makefile": "`make demo`, `make test`, `make test-slow`, `make bench` (each installs `.venv` from the lock when "
                "missing), `make lock`",
    "requirements.lock": "every dependency pinned with hashes, what `make` installs (`make lock` re-resolves it)",
    ".ci/run": "CI: `make test` on a clean checkout",
    "pyproject.toml": "the package, its dependency ranges, the `torch==2.13.0` pin, the console script `mergelib`",
    "dvc.yaml, params.yaml, conf/": "the pipeline, its composed parameters, the Hydra config groups",
    "mergelib/arch/specs/*.json": "tensor-name templates of the architecture families",
    "mergelib/pipeline/eval_tasks/": "lm-eval task YAMLs and held-out jsonl of the demo skills",
    "docs/figures/*.json": "the measurements the README's tables are rendered from (`make readme-figures`)",
    "tests/": "mirrors the package; `tests/methods/` one file per method; `tests/stages/` real stage subprocesses",
}
PREAMBLE = """The package root holds only the public API (`__init__`), `__main__`, the CLI and the user-facing errors;
everything else sits in a subpackage named for its part of the architecture. The merge itself is `merging/`, not
`merge/`: `mergelib.merge` is the public function, and a subpackage of that name would replace it on import.
`methods/`, `io/`, `arch/`, `config/` and `tokenizer/` are what `merging/` is built from; `moe/` and `lora/` are the
other tools of the CLI; `pipeline/` is what `stages/` calls; `families/` makes models offline (the demo family,
SmolLM2, the seeded tiny families of the tests and benchmarks); `export/` and `publish/` come after a merge.
This table is generated from the modules' docstrings by `tools/file_map.py` (a test checks it is current)."""


def summary(path: Path) -> str:
    """The first sentence of the module's docstring on one line (the whole sentence, never cut)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if not paragraph:
        raise SystemExit(f"{path.relative_to(REPO)}: no module docstring; give it one line saying what it is")
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", paragraph)[0]
    return first.replace("|", "\\|")


def modules() -> list[Path]:
    out = []
    for top in CODE_DIRS:
        out += sorted(p for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts)
    return out


def table() -> str:
    rows = ["| path | what it is |", "|---|---|"]
    rows += [f"| `{path}` | {text} |" for path, text in FILES.items()]
    for path in modules():
        rel = path.relative_to(REPO)
        shown = f"{rel.parent}/" if path.name == "__init__.py" else str(rel)
        rows.append(f"| `{shown}` | {summary(path)} |")
    return "\n".join([START, PREAMBLE, "", *rows, END])


def main(argv: list[str]) -> int:
    readme = REPO / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md: no {START} ... {END} block; add one where the file map goes", file=sys.stderr)
        return 2
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = before + table() + after
    if "--check" in argv:
        if new != text:
            print("README.md: the file map is stale; run `python tools/file_map.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
