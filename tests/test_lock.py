"""requirements.lock is what `make` installs: current with pyproject.toml and constraints.txt, every declared
dependency pinned inside its range, torch the CPU 2.13.0 build, and the check fails when anything drifts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
lock_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_tool)
TEXT = (REPO / "requirements.lock").read_text()


def test_the_committed_lock_is_current():
    proc = subprocess.run([sys.executable, "tools/lock.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert lock_tool.problems(TEXT) == []


def test_every_pin_has_hashes_and_torch_is_the_cpu_build():
    pins = lock_tool.pins(TEXT)
    assert pins["torch"].startswith("2.13.0") and len(pins) > 100
    blocks = [b for b in TEXT.split("\n") if "==" in b and not b.startswith("#")]
    assert all(b.rstrip().endswith("\\") for b in blocks)  # each pin continues with its --hash lines
    assert "--extra-index-url" not in TEXT and "--find-links" not in TEXT  # no machine-local index lines


def test_the_check_fails_when_pyproject_changes(monkeypatch):
    declared = lock_tool.declared()
    monkeypatch.setattr(lock_tool, "declared", lambda: [*declared, "absent-package>=1"])
    found = lock_tool.problems(TEXT)
    assert any("changed since requirements.lock was made" in p for p in found)
    assert "absent-package is declared but not locked" in found


def test_the_check_fails_when_a_pin_breaks_a_range(monkeypatch):
    declared = lock_tool.declared()
    changed = [d if not d.startswith("numba") else "numba>=99" for d in declared]
    monkeypatch.setattr(lock_tool, "declared", lambda: changed)
    assert any(p.startswith("numba==") and "breaks the declared '>=99'" in p for p in lock_tool.problems(TEXT))


def test_the_llamacpp_extra_has_its_own_hashed_lock_on_top_of_the_main_one(monkeypatch):
    text = (REPO / "requirements-llamacpp.lock").read_text()
    assert lock_tool.extra_problems("llamacpp", text) == []
    pins = lock_tool.pins(text)
    assert pins["llama-cpp-python"] == "0.3.36"
    main = lock_tool.pins(TEXT)
    assert all(main[name] == version for name, version in pins.items() if name in main)  # shared pins agree
    assert "llama-cpp-python" not in main  # `make test` never compiles llama.cpp
    blocks = [b for b in text.split("\n") if "==" in b and not b.startswith("#")]
    assert all(b.rstrip().endswith("\\") for b in blocks)
    monkeypatch.setattr(lock_tool, "extra_declared", lambda extra: ["llama-cpp-python==0.3.37"])
    assert any("not locked as declared" in p for p in lock_tool.extra_problems("llamacpp", text))
