"""Every export a run asks for in one directory, each checked by reading it back, with a DVC metrics file.

Layout of `out_dir`: `safetensors-<dtype>/`, `safetensors-int8/`, `<name>-<type>.gguf`, `metrics.json`
(numbers and pass/fail per export: the DVC metric) and `export_report.json` (files, sha256, thresholds, notes, and
with held-out tasks given, each GGUF's exact-match answers in llama.cpp next to the source's).
The directory is built aside and swapped in whole; when a check fails it is still written (so the metric shows
the failure) and then ExportCheckError is raised with one line naming every miss.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mergelib.export import llamacpp
from mergelib.export.answers import Example, answer_accuracy
from mergelib.export.artifact import ExportArtifact
from mergelib.export.check import DEFAULT_PROMPTS, DEFAULT_THRESHOLDS, run_source, verify_export
from mergelib.export.errors import ExportCheckError, ExportError
from mergelib.export.gguf_file import ALL_GGUF_TYPES, export_gguf
from mergelib.export.int8 import export_int8
from mergelib.export.resave import DTYPES, export_safetensors
from mergelib.export.staging import staged_dir

METRIC_KEYS = ("kl_mean", "kl_max", "top1", "top1_clear", "ties", "max_abs_logit_diff", "nll_source", "nll_export",
               "positions", "tokens_match", "passed", "bytes")


@dataclass(frozen=True)
class ExportResult:
    """What `export_all` wrote and how each export compared with its source."""

    out_dir: Path
    artifacts: dict[str, ExportArtifact]  # by name (gguf-q8_0, ...), paths inside out_dir
    checks: dict[str, dict]  # by name: verify_export's dict (empty when verify=False)
    answers: dict[str, dict[str, float]] | None = None  # "source" and each GGUF name -> task -> exact match (tasks given)

    @property
    def passed(self) -> bool:
        return all(check.get("passed", True) for check in self.checks.values())

    def metrics(self) -> dict:
        """The DVC metric: per export, numbers and booleans only."""
        out = {name: {k: check[k] for k in METRIC_KEYS if k in check} for name, check in self.checks.items()}
        answers = dict(self.answers or {})
        source = answers.pop("source", {})
        for name, scores in answers.items():  # each GGUF's answers in llama.cpp, next to the merge's own
            out.setdefault(name, {}).update({f"exact_match.{task}": v for task, v in scores.items()})
            out[name].update({f"source_exact_match.{task}": v for task, v in source.items()})
        return out


def export_all(model_dir: str | Path, out_dir: str | Path, *, safetensors: Sequence[str] = (),
               gguf: Sequence[str] = (), int8: bool = False, name: str | None = None,
               shard_size: int = 5_000_000_000, tokenizer_dir: str | Path | None = None, verify: bool = True,
               prompts: Sequence[str] = DEFAULT_PROMPTS, thresholds: Mapping[str, Mapping[str, float]] | None = None,
               quiet: bool = True, tasks: Mapping[str, Sequence[Example]] | None = None,
               threads: int = 1) -> ExportResult:
    """Export `model_dir` to `out_dir` in each asked format (safetensors dtypes, GGUF types, int8) and verify
    each one; with `tasks` (name -> (prompt, answer) pairs, and llama.cpp installed) also score the exact-match
    answers of the source and of each GGUF. Raises ExportCheckError after writing everything when any check
    fails."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for dtype in safetensors:
        if dtype not in DTYPES:
            raise ExportError(f"export safetensors dtype '{dtype}': choose from {', '.join(DTYPES)}")
    for kind in gguf:
        if kind not in ALL_GGUF_TYPES:
            raise ExportError(f"export gguf type '{kind}': choose from {', '.join(ALL_GGUF_TYPES)}")
        if kind in llamacpp.K_QUANTS:
            llamacpp.require(f"GGUF {kind.upper()}")  # before any export is written
    if not (safetensors or gguf or int8):
        raise ExportError("export: nothing asked for; give safetensors dtypes, gguf types or int8")
    limits = {**DEFAULT_THRESHOLDS, **{k: dict(v) for k, v in (thresholds or {}).items()}}
    stem = name or model_dir.resolve().name
    artifacts: dict[str, ExportArtifact] = {}
    checks: dict[str, dict] = {}
    with staged_dir(out_dir, marker="export_report.json") as staged:
        built = [export_safetensors(model_dir, staged / f"safetensors-{dtype}", dtype=dtype, shard_size=shard_size,
                                    tokenizer_dir=tokenizer_dir) for dtype in dict.fromkeys(safetensors)]
        built += [export_gguf(model_dir, staged / f"{stem}-{kind}.gguf", gguf_type=kind, tokenizer_dir=tokenizer_dir,
                              name=stem, threads=threads) for kind in dict.fromkeys(gguf)]
        if int8:
            built.append(export_int8(model_dir, staged / "safetensors-int8", shard_size=shard_size,
                                     tokenizer_dir=tokenizer_dir))
        source = run_source(model_dir, prompts, tokenizer_dir, quiet) if verify else None
        for artifact in built:
            if source is not None:
                checks[artifact.name] = verify_export(source, artifact, thresholds=limits.get(artifact.name, {}),
                                                      quiet=quiet, raise_on_fail=False)
            artifacts[artifact.name] = replace(artifact, path=out_dir / artifact.path.relative_to(staged))
        answers = None
        if tasks and any(a.kind == "gguf" for a in built) and llamacpp.available():
            answers = answer_accuracy(model_dir, tokenizer_dir, built, tasks)
        result = ExportResult(out_dir, artifacts, checks, answers)
        report = {"source": str(model_dir), "artifacts": {k: a.record() for k, a in artifacts.items()},
                  "checks": checks, "prompts": list(prompts), "exact_match": answers}
        (staged / "metrics.json").write_text(json.dumps(result.metrics(), indent=2, sort_keys=True) + "\n")
        (staged / "export_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    missed = [reason for check in checks.values() for reason in check.get("failures", [])]
    if missed:
        raise ExportCheckError(f"export check failed: {'; '.join(missed)} (see {out_dir / 'metrics.json'})")
    return result
