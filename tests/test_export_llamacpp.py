"""K-quant GGUF through llama.cpp's quantizer and every GGUF checked in llama.cpp itself (the `llamacpp` extra).

Without llama-cpp-python: a K-quant asks for the extra in one line (exit 2 from the stage), before anything is
written (the stage's exit 2: tests/stages/test_stage_commands.py). With it (skipped otherwise; `make test-slow` installs it): the tiny family's f16 file gives the source's
logits in llama.cpp, K-quants pass their thresholds and fall back where rows do not fill 256-wide blocks, greedy
answers in llama.cpp match transformers' on the f16 file, and a file llama.cpp cannot load fails its check.
"""

from __future__ import annotations

import json
import sys

import gguf
import pytest

from mergelib.export import ExportError, export_all, export_gguf
from mergelib.export.llamacpp import K_QUANTS

HAVE_LLAMACPP = True
try:
    import llama_cpp  # noqa: F401
except ImportError:
    HAVE_LLAMACPP = False
needs_llamacpp = pytest.mark.skipif(not HAVE_LLAMACPP, reason="llama-cpp-python is not installed: "
                                    "pip install 'mergelib[llamacpp]' (make test-slow installs it)")


@pytest.mark.parametrize("kind", sorted(K_QUANTS))
def test_kquant_without_llamacpp_names_the_extra(tiny_family, tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(ExportError) as err:
        export_gguf(tiny_family.base, tmp_path / "m.gguf", gguf_type=kind)
    assert str(err.value) == f"GGUF {kind.upper()} needs llama.cpp: pip install 'mergelib[llamacpp]' (or `make demo`)"
    with pytest.raises(ExportError, match="needs llama.cpp"):
        export_all(tiny_family.base, tmp_path / "out", safetensors=("float16",), gguf=("f16", kind))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_gguf_without_llamacpp_is_read_back_by_transformers(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    result = export_all(tiny_family.base, tmp_path / "out", gguf=("f16",), name="tiny")
    check = result.checks["gguf-f16"]
    assert check["reader"] == "transformers" and check["passed"]
    assert any("llama.cpp is not installed" in n for n in check["notes"])


@pytest.fixture(scope="module")
def kquant_export(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("kq") / "out"
    return export_all(tiny_family.base, out, gguf=("f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"), name="tiny",
                      tasks={"probe": [("abc", "x"), ("hello", "y")]})


@pytest.fixture(scope="module")
def f16_export(tiny_family, tmp_path_factory):
    return export_all(tiny_family.base, tmp_path_factory.mktemp("f16") / "out", gguf=("f16",), name="tiny")


@pytest.mark.slow
@needs_llamacpp
def test_llamacpp_reads_every_gguf_within_its_threshold(kquant_export):
    checks = kquant_export.checks
    assert all(c["reader"] == "llama.cpp" and c["passed"] and c["tokens_match"] for c in checks.values()), checks
    assert checks["gguf-f16"]["top1_clear"] == 1.0 and checks["gguf-f16"]["kl_mean"] < 1e-3
    assert checks["gguf-q6_k"]["thresholds"] == {"max_kl": 0.1, "min_top1": 0.85}
    for name in ("gguf-q4_k_m", "gguf-q5_k_m", "gguf-q6_k"):
        reader = gguf.GGUFReader(str(kquant_export.artifacts[name].path))
        assert reader.get_field("general.file_type").contents() == K_QUANTS[name.removeprefix("gguf-")]
        # the tiny model's rows are 64 wide: llama.cpp stores them in a 32-block fallback type, and says so
        assert any("rows not a multiple of 256" in n for n in checks[name]["notes"]), checks[name]["notes"]
    report = json.loads((kquant_export.out_dir / "export_report.json").read_text())
    assert set(report["exact_match"]) == {"source", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q5_k_m",
                                          "gguf-q6_k"}
    assert kquant_export.metrics()["gguf-f16"]["exact_match.probe"] == report["exact_match"]["gguf-f16"]["probe"]


@needs_llamacpp
def test_f16_greedy_answers_in_llamacpp_match_transformers(tiny_family, f16_export):
    from mergelib.export import llamacpp
    from mergelib.export.answers import source_answers

    prompts = ["The quick brown", "abc|", "12+34=", "hello world"]
    want = source_answers(tiny_family.base, None, {"p": prompts}, max_new_tokens=6)["p"]
    assert f16_export.checks["gguf-f16"]["reader"] == "llama.cpp" and f16_export.checks["gguf-f16"]["passed"]
    with llamacpp.open_gguf(f16_export.artifacts["gguf-f16"].path) as model:
        got = llamacpp.greedy_answers(model, prompts, max_new_tokens=6)
    assert got == want


@needs_llamacpp
def test_a_file_llamacpp_cannot_load_fails_the_check(tiny_family, f16_export, tmp_path):
    from dataclasses import replace

    from mergelib.export.check import verify_export

    bad = tmp_path / "bad.gguf"
    data = f16_export.artifacts["gguf-f16"].path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: tensor data missing
    artifact = replace(f16_export.artifacts["gguf-f16"], path=bad)
    check = verify_export(tiny_family.base, artifact, raise_on_fail=False)
    assert check["passed"] is False and "does not load back" in check["failures"][0]
