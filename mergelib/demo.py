"""`make demo` before the pipeline: build the tiny family offline and merge it with `mergelib merge`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from mergelib.testing.tiny import ensure_family

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
"""


def main(root: Path = Path("out/demo")) -> int:
    family = ensure_family(root / "family", size="tiny", n_finetunes=2, seed=0)
    recipe = root / "recipe.yml"
    recipe.write_text(RECIPE.format(base=family.base, ft1=family.finetunes[0], ft2=family.finetunes[1]))
    yaml.safe_load(recipe.read_text())
    cmd = [sys.executable, "-m", "mergelib", "merge", str(recipe), str(root / "merged"), "--quiet"]
    print("$ mergelib merge", recipe, root / "merged")
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
