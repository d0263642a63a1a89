"""The statistics a plan's method needs, for each input model: precomputed files from the recipe, or gathered from
the calibration data and cached under $MERGELIB_CACHE/statistics by a content hash of (statistics format, kind,
the model's files' sha256, the data's sha256, tokens, seed, sequence_length), so a second merge with other
parameters reuses them. RegMean++'s depend on every model and the whole recipe, which its key includes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

from mergelib.calibration.data import read_texts, token_count, token_sequences
from mergelib.calibration.store import FORMAT_VERSION, StatisticsStore, check_statistics_file
from mergelib.errors import InputModelError
from mergelib.io.cache import cache_dir
from mergelib.io.hashing import sha256_file, sha256_files


def cache_root() -> Path:
    return cache_dir("statistics")


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def model_identity(model) -> dict[str, str]:
    """sha256 of a model's weight files and config.json, by path relative to its directory."""
    files = sorted(set(model.index.files) | {model.path / "config.json"})
    digests = sha256_files([Path(f) for f in files])
    return {os.path.relpath(f, model.path): digests[str(f)] for f in files}


def check_calibration(plan_recipe, method, models, jobs) -> None:
    """Planning-time checks (no weights read): the data file reads as texts, or each precomputed statistics file
    is of the method's kind with shapes that fit the weights it names."""
    calibration = plan_recipe.calibration
    if method.statistics is None or calibration is None:
        return
    if calibration.data is not None:
        read_texts(calibration.data)
        return
    weights: dict[int, dict[str, tuple[int, ...]]] = {}
    for job in jobs:
        for source in job.sources:
            weights.setdefault(source.model, {})[source.name] = tuple(source.info.shape)
    for i, model in enumerate(models):
        path = Path(calibration.statistics[model.label])
        check_statistics_file(path, method.statistics, model.label, weights.get(i, {}))


def _tokenizer(model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.path)
    except (OSError, ValueError) as exc:
        raise InputModelError(
            f"model '{model.label}': no tokenizer to read the calibration data with ({exc})") from None


def statistics_for(plan, seed: int = 0) -> StatisticsStore:
    """The plan's statistics store, gathering (layer by layer) whatever is not cached yet."""
    method, calibration = plan.method, plan.recipe.calibration
    if calibration.statistics is not None:
        files = {i: Path(calibration.statistics[m.label]) for i, m in enumerate(plan.models)}
        return StatisticsStore(method.statistics, files, {i: sha256_file(p) for i, p in files.items()},
                               {i: True for i in files})
    data = Path(calibration.data)
    texts = read_texts(data)
    settings = {"format": FORMAT_VERSION, "kind": method.statistics, "flow": method.statistics_flow,
                "data_sha256": sha256_file(data), "tokens": calibration.tokens, "seed": calibration.seed,
                "sequence_length": calibration.sequence_length}

    def sequences_for(model):
        return token_sequences(texts, _tokenizer(model), calibration.tokens, calibration.sequence_length,
                               calibration.seed)

    def metadata(sequences, label: str) -> dict[str, str]:
        return {"kind": method.statistics, "tokens": str(token_count(sequences)), "samples": str(len(sequences)),
                "model": label, **{k: str(v) for k, v in settings.items() if k not in ("format", "kind")}}

    identities = [model_identity(m) for m in plan.models]
    root = cache_root()
    if method.statistics_flow == "merged":
        key = _digest([settings, identities, plan.recipe.to_yaml(), seed])
        files = {i: root / f"gram-merged-{key[:32]}-{i}.safetensors" for i in range(len(plan.models))}
        reused = all(p.is_file() for p in files.values())
        if not reused:
            from mergelib.calibration.plusplus import gather_merged_grams

            sequences = sequences_for(plan.models[plan.donor])
            gather_merged_grams(replace(plan, statistics=None), sequences, files,
                                metadata(sequences, plan.models[plan.donor].label), seed)
        return StatisticsStore(method.statistics, files, {i: key for i in files}, {i: reused for i in files})
    files, digests, reused = {}, {}, {}
    for i, model in enumerate(plan.models):
        key = _digest([settings, identities[i]])
        path = root / f"{method.statistics}-{key[:32]}.safetensors"
        reused[i] = path.is_file()
        if not reused[i]:
            _gather(method.statistics, model, sequences_for(model), path, metadata)
        files[i], digests[i] = path, key
    return StatisticsStore(method.statistics, files, digests, reused)


def _gather(kind: str, model, sequences, path: Path, metadata) -> None:
    from mergelib.calibration.fisher import gather_fisher
    from mergelib.calibration.gram import gather_grams
    from mergelib.calibration.layers import LayerwiseModel

    gather = gather_grams if kind == "gram" else gather_fisher
    gather(LayerwiseModel(model), sequences, path, metadata(sequences, model.label))

