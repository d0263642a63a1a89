"""The dependency lock: `requirements.lock` pins every package (hashes included) that `make` installs, resolved by
pip-tools from pyproject.toml and constraints.txt. `python tools/lock.py` rewrites it (`make lock`); `--check`
exits 1 when pyproject.toml or constraints.txt changed since (the digest line) or a pin breaks a declared range.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
DIGEST_PREFIX = "# dependencies-sha256: "
EXTRAS = ("test",)
# Machine-specific index lines pip-compile copies from the local pip configuration: not part of the lock.
LOCAL_LINES = re.compile(r"^--(extra-index-url|index-url|find-links|trusted-host)\b")


def declared() -> list[str]:
    """Every requirement the project declares (dependencies and the locked extras) and its constraints."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    constraints = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines() if line.strip()]
    return reqs + [f"constraint {c}" for c in constraints]


def digest() -> str:
    """sha256 of what the lock was resolved from; a changed requirement changes it."""
    return hashlib.sha256(json.dumps(declared()).encode()).hexdigest()


def pins(text: str) -> dict[str, str]:
    """Package name (normalised) -> pinned version, from the lock's text."""
    out = {}
    for match in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", text, re.M):
        out[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return out


def problems(text: str) -> list[str]:
    """Why the lock text is out of date with pyproject.toml and constraints.txt (empty when it is current)."""
    from packaging.requirements import Requirement

    found = []
    line = next((ln for ln in text.splitlines() if ln.startswith(DIGEST_PREFIX)), None)
    if line is None or line.removeprefix(DIGEST_PREFIX).strip() != digest():
        found.append("pyproject.toml or constraints.txt changed since requirements.lock was made")
    pinned = pins(text)
    for spec in declared():
        req = Requirement(spec.removeprefix("constraint "))
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name not in pinned:
            found.append(f"{req.name} is declared but not locked")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            found.append(f"{req.name}=={pinned[name]} in the lock breaks the declared '{req.specifier}'")
    return found


def write() -> None:
    """Resolve with pip-tools (pip-compile on PATH) and write requirements.lock."""
    tmp = LOCK.with_suffix(".tmp")
    cmd = ["pip-compile", "--quiet", "--generate-hashes", "--allow-unsafe", "--strip-extras", "--no-emit-index-url",
           "--no-emit-find-links", "--constraint=constraints.txt", *(f"--extra={e}" for e in EXTRAS),
           f"--output-file={tmp.name}", "pyproject.toml"]
    subprocess.run(cmd, cwd=REPO, check=True)
    body = [ln for ln in tmp.read_text().splitlines() if not LOCAL_LINES.match(ln)]
    header = ["# Every dependency of mergelib pinned with hashes; `make` installs exactly these (--require-hashes).",
              "# `make lock` regenerates it when pyproject.toml or constraints.txt change; a test checks the digest.",
              f"{DIGEST_PREFIX}{digest()}"]
    LOCK.write_text("\n".join(header + body) + "\n")
    tmp.unlink()


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = problems(LOCK.read_text()) if LOCK.is_file() else ["requirements.lock is missing"]
        for line in found:
            print(f"requirements.lock: {line}; run `make lock`", file=sys.stderr)
        return 1 if found else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
