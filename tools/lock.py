"""The dependency lock: `requirements.lock` pins every package (hashes included) that `make` installs, resolved by
pip-tools from pyproject.toml and constraints.txt. `python tools/lock.py` rewrites it (`make lock`); `--check`
exits 1 when pyproject.toml or constraints.txt changed since (the digest line) or a pin breaks a declared range.
Extras that compile native code (`llamacpp`: llama.cpp from llama-cpp-python's sdist, minutes of C++) get their own
lock, `requirements-<extra>.lock`, resolved on top of requirements.lock: `make demo` installs it, `make test` not.
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
SEPARATE_EXTRAS = ("llamacpp",)  # each in requirements-<extra>.lock, pinned against requirements.lock
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


def extra_lock(extra: str) -> Path:
    return REPO / f"requirements-{extra}.lock"


def extra_declared(extra: str) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project.get("optional-dependencies", {}).get(extra, []))


def extra_digest(extra: str) -> str:
    """sha256 of the extra's requirements and of requirements.lock it is resolved against."""
    blob = json.dumps([extra_declared(extra), hashlib.sha256(LOCK.read_bytes()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()


def extra_problems(extra: str, text: str) -> list[str]:
    """Why requirements-<extra>.lock is out of date (empty when current)."""
    from packaging.requirements import Requirement

    found = []
    line = next((ln for ln in text.splitlines() if ln.startswith(DIGEST_PREFIX)), None)
    if line is None or line.removeprefix(DIGEST_PREFIX).strip() != extra_digest(extra):
        found.append(f"the {extra} extra or requirements.lock changed since it was made")
    pinned = pins(text)
    for spec in extra_declared(extra):
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name not in pinned or not req.specifier.contains(pinned[name], prereleases=True):
            found.append(f"{req.name} is not locked as declared ('{req.specifier}')")
    return found


def write_extra(extra: str) -> None:
    """Resolve the extra's requirements constrained by requirements.lock (shared packages keep their pins)."""
    path = extra_lock(extra)
    source = path.with_name(f".{extra}.in")
    tmp = path.with_suffix(".tmp")
    source.write_text("\n".join(extra_declared(extra)) + "\n")
    cmd = ["pip-compile", "--quiet", "--generate-hashes", "--allow-unsafe", "--strip-extras", "--no-emit-index-url",
           "--no-emit-find-links", f"--constraint={LOCK.name}", f"--output-file={tmp.name}", source.name]
    try:
        subprocess.run(cmd, cwd=REPO, check=True)
    finally:
        source.unlink(missing_ok=True)
    body = [ln.replace(source.name, f"mergelib[{extra}]") for ln in tmp.read_text().splitlines()
            if not LOCAL_LINES.match(ln)]
    header = [f"# The `{extra}` extra (mergelib[{extra}]) pinned with hashes on top of requirements.lock; `make demo`",
              "# installs it (it compiles native code, so `make test` does not). `make lock` regenerates it.",
              f"{DIGEST_PREFIX}{extra_digest(extra)}"]
    path.write_text("\n".join(header + body) + "\n")
    tmp.unlink()


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = problems(LOCK.read_text()) if LOCK.is_file() else ["requirements.lock is missing"]
        for line in found:
            print(f"requirements.lock: {line}; run `make lock`", file=sys.stderr)
        extra_found = []
        for extra in SEPARATE_EXTRAS:
            path = extra_lock(extra)
            extra_found += [f"{path.name}: {p}" for p in
                            (extra_problems(extra, path.read_text()) if path.is_file() else ["missing"])]
        for line in extra_found:
            print(f"{line}; run `make lock`", file=sys.stderr)
        return 1 if found or extra_found else 0
    if "--extras-only" not in argv:
        write()
    for extra in SEPARATE_EXTRAS:
        write_extra(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
