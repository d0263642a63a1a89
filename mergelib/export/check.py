"""Read an export back with an independent reader and compare it with its source on fixed prompts.

GGUF files are loaded by llama.cpp (mergelib.export.llamacpp, the `llamacpp` extra) where it is installed, else by
transformers' GGUF reader (`from_pretrained(dir, gguf_file=...)`; K-quants always need llama.cpp), safetensors exports
(int8 included, via transformers' compressed-tensors integration) by plain `from_pretrained`. Both models see
the same input ids (the source tokenizer's); the export's own tokenizer must produce the same ids. Per position,
KL(source || export) of the next-token distributions and whether the argmax agrees; thresholds per format decide
pass or fail.
Top-1 thresholds count only positions where the source has a clear winner (its best logit leads the second by
at least `tie_margin`): at a near-tie either token is an equally right answer, and rounding may pick the other.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelib.export import llamacpp
from mergelib.export.artifact import ExportArtifact
from mergelib.export.errors import ExportCheckError, ExportError

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Model merging combines the weights of several fine-tuned models into one.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Paris est la capitale de la France, et Berlin celle de l'Allemagne.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89",
)
# max_kl: mean KL(source || export) must stay below it; min_top1: argmax agreement must reach it (positions with a
# clear winner). GGUF limits hold for llama.cpp, which also rounds activations (f16, q8 dot products), and for
# transformers' reader. They are set about 2-3x (KL) and 0.1 (top-1) past the worst file measured in llama.cpp on the
# tiny, demo and SmolLM2-135M models (README, "GGUF for llama.cpp"): they catch a broken file, and the report gives
# the numbers for judging quality (SmolLM2 q8_0: KL 0.009; q6_k: 0.030, top-1 0.93; q4_k_m: 0.091, top-1 0.79).
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "gguf-f16": {"min_top1": 1.0},
    "gguf-bf16": {"max_kl": 0.01},
    "gguf-q8_0": {"max_kl": 0.03},
    "gguf-q4_0": {},  # recorded, not enforced: 4-bit error depends on the model
    "gguf-q6_k": {"max_kl": 0.1, "min_top1": 0.85},
    "gguf-q5_k_m": {"max_kl": 0.25, "min_top1": 0.75},
    "gguf-q4_k_m": {"max_kl": 0.25, "min_top1": 0.7},
    "safetensors-float32": {"min_top1": 1.0},
    "safetensors-float16": {"min_top1": 1.0},
    "safetensors-bfloat16": {"max_kl": 0.01},
    "safetensors-int8": {"max_kl": 0.01},
}
TIE_MARGIN = 0.01  # logits (nats): a lead smaller than this is a tie, not a decision
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence transformers' logging and progress bars (tqdm writes to stderr)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(level)


def compare_logits(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor] | None = None, tie_margin: float = TIE_MARGIN) -> dict[str, float]:
    """KL(reference || candidate) per position (mean, max), top-1 agreement (over all positions, and over those
    where the reference's lead is at least `tie_margin`) and max |logit difference|, over every position of every
    prompt; with `targets` (next token ids), each model's mean negative log-likelihood."""
    kls, agree, diff, positions = [], 0, 0.0, 0
    clear = clear_agree = 0
    nll_ref = nll_cand = 0.0
    for k, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        log_p = torch.log_softmax(ref.double(), dim=-1)  # (positions, vocab)
        log_q = torch.log_softmax(cand.double(), dim=-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        same = ref.argmax(-1) == cand.argmax(-1)  # (positions,)
        top2 = ref.topk(min(2, ref.shape[-1]), dim=-1).values  # (positions, 2)
        decided = (top2[:, 0] - top2[:, -1]) >= tie_margin
        agree += int(same.sum())
        clear += int(decided.sum())
        clear_agree += int((same & decided).sum())
        diff = max(diff, float((ref.double() - cand.double()).abs().max()))
        positions += ref.shape[0]
        if targets is not None:
            nxt = targets[k]  # (positions - 1,): the token after each position but the last
            nll_ref -= float(log_p[:-1].gather(-1, nxt[:, None]).sum())
            nll_cand -= float(log_q[:-1].gather(-1, nxt[:, None]).sum())
    kl = torch.cat(kls)
    out = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": agree / positions,
           "top1_clear": clear_agree / clear if clear else 1.0, "ties": positions - clear,
           "max_abs_logit_diff": diff, "positions": positions}
    if targets is not None:
        n = sum(len(t) for t in targets)
        out["nll_source"] = nll_ref / n
        out["nll_export"] = nll_cand / n
    return out


def failures(name: str, metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """Human-readable reasons `metrics` miss `thresholds` (empty when they pass)."""
    out = []
    if "max_kl" in thresholds and not metrics["kl_mean"] < thresholds["max_kl"]:
        out.append(f"{name} KL {metrics['kl_mean']:.4g} >= {thresholds['max_kl']:g}")
    if "min_top1" in thresholds and not metrics["top1_clear"] >= thresholds["min_top1"]:
        out.append(f"{name} top-1 agreement {metrics['top1_clear']:.4f} < {thresholds['min_top1']:g} "
                   f"(positions with a clear winner)")
    unknown = set(thresholds) - {"max_kl", "min_top1"}
    if unknown:
        raise ExportCheckError(f"thresholds for {name}: unknown key(s) {sorted(unknown)}; use max_kl, min_top1")
    return out


def _logits(model, prompt_ids: Sequence[list[int]]) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out.append(model(torch.tensor([ids])).logits[0].float())  # (positions, vocab)
    return out


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def _gguf_config(path: Path, source_config, notes: list[str]):
    """transformers' config read from the GGUF, checked field by field against the source's."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture").contents()
    key_length = reader.get_field(f"{arch}.attention.key_length")
    for field in CONFIG_FIELDS:
        want, got = getattr(source_config, field, None), getattr(config, field, None)
        if want is None or want == got:
            continue
        if field == "head_dim" and key_length is not None and key_length.contents() == want:
            # transformers maps no GGUF key to head_dim for qwen2/qwen3; the file's key_length holds it
            config.head_dim = want
            notes.append(f"head_dim {want} read from {arch}.attention.key_length (transformers does not map it)")
            continue
        raise ExportCheckError(f"{path.name}: config {field} reads back as {got}, the source has {want}")
    want, got = _rope_theta(source_config), _rope_theta(config)
    if want is not None and (got is None or not math.isclose(want, got, rel_tol=1e-6)):
        raise ExportCheckError(f"{path.name}: config rope_theta reads back as {got}, the source has {want}")
    if not math.isclose(source_config.rms_norm_eps, config.rms_norm_eps, rel_tol=1e-6):
        raise ExportCheckError(f"{path.name}: config rms_norm_eps reads back as {config.rms_norm_eps}, "
                               f"the source has {source_config.rms_norm_eps}")
    return config


def load_export(artifact: ExportArtifact, source_config, notes: list[str]):
    """(model, tokenizer) of an export, loaded by the reader its users would use, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(artifact.path)
    if artifact.kind == "gguf":
        config = _gguf_config(path, source_config, notes)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tokenizer


def _token_mismatch(name: str, want: Sequence[list[int]], got: Sequence[list[int]]) -> str | None:
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        b = b[: len(a)]  # the source's ids may be cut to its context length
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return (f"{name} tokenizer encodes prompt {k} differently from the source "
                    f"(first difference at token {at}: {b[at:at + 3]} vs {a[at:at + 3]})")
    return None


@dataclass(frozen=True)
class SourceRun:
    """The source model's input ids and logits on the prompts: computed once, compared with every export."""

    prompts: tuple[str, ...]
    prompt_ids: list[list[int]]
    logits: list[torch.Tensor]
    config: object  # the source's transformers config


def run_source(source_dir: str | Path, prompts: Sequence[str] = DEFAULT_PROMPTS,
               tokenizer_dir: str | Path | None = None, quiet: bool = True) -> SourceRun:
    """Tokenize `prompts` with the source tokenizer and run the source model on them (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _quiet(quiet):
        config = AutoConfig.from_pretrained(str(source_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or source_dir))
        # cut to the model's context: beyond it no reader is expected to agree (llama.cpp refuses longer input)
        limit = getattr(config, "max_position_embeddings", None) or None
        prompt_ids = [tokenizer(p)["input_ids"][:limit] for p in prompts]
        model = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32).eval()
        logits = _logits(model, prompt_ids)
    return SourceRun(tuple(prompts), prompt_ids, logits, config)


def verify_export(source: str | Path | SourceRun, artifact: ExportArtifact, *,
                  prompts: Sequence[str] = DEFAULT_PROMPTS, thresholds: Mapping[str, float] | None = None,
                  tokenizer_dir: str | Path | None = None, tie_margin: float = TIE_MARGIN, quiet: bool = True,
                  raise_on_fail: bool = True) -> dict:
    """Metrics of `artifact` against its source model (a directory, or a `run_source` result to reuse):
    kl_mean, kl_max, top1, top1_clear, ties, max_abs_logit_diff, nll_source, nll_export, positions, tokens_match,
    passed, thresholds, notes. A miss raises ExportCheckError (one line) unless `raise_on_fail` is False, in
    which case `passed` is False and `failures` says why."""
    if not isinstance(source, SourceRun):
        source = run_source(source, prompts, tokenizer_dir, quiet)
    limits = dict(DEFAULT_THRESHOLDS.get(artifact.name, {}) if thresholds is None else thresholds)
    notes = list(artifact.notes)
    reader = "llama.cpp" if artifact.kind == "gguf" and llamacpp.available() else "transformers"
    try:
        if reader == "llama.cpp":
            with llamacpp.open_gguf(artifact.path) as model:
                candidate = llamacpp.logits(model, source.prompt_ids)
                export_ids = [llamacpp.tokenize(model, p) for p in source.prompts]
        else:
            if artifact.kind == "gguf":
                notes.append("read back by transformers: llama.cpp is not installed (pip install 'mergelib[llamacpp]')")
            with _quiet(quiet):
                model, export_tokenizer = load_export(artifact, source.config, notes)
                candidate = _logits(model, source.prompt_ids)
                del model
                export_ids = [export_tokenizer(p)["input_ids"] for p in source.prompts]
    except ExportCheckError as exc:  # its config reads back wrong
        metrics: dict = {"tokens_match": False}
        missed = [f"{artifact.name}: {exc}"]
    except ExportError as exc:  # llama.cpp cannot load it
        metrics = {"tokens_match": False}
        missed = [f"{artifact.name} does not load back ({exc})"]
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        # the export does not even load: that is the check failing, reported like any other miss
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        metrics = {"tokens_match": False}
        missed = [f"{artifact.name} does not load back ({type(exc).__name__}: {first[:200]})"]
    else:
        targets = [torch.tensor(ids[1:]) for ids in source.prompt_ids]
        metrics = compare_logits(source.logits, candidate, targets, tie_margin)
        mismatch = _token_mismatch(artifact.name, source.prompt_ids, export_ids)
        metrics["tokens_match"] = mismatch is None
        missed = failures(artifact.name, metrics, limits) + ([mismatch] if mismatch else [])
    metrics.update(passed=not missed, thresholds=limits, tie_margin=tie_margin, bytes=artifact.bytes, notes=notes,
                   reader=reader)
    if missed:
        metrics["failures"] = missed
        if raise_on_fail:
            raise ExportCheckError(f"export check failed: {'; '.join(missed)} ({artifact.path})")
    return metrics
