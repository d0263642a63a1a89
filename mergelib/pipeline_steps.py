"""The thin pipeline steps after the merge: tokenizer check, safetensors export, publish manifest.

Each is real but minimal; the tokenizer, export and publish issues replace them. Outputs are written to a
temporary sibling and swapped in (mergelib.io.atomic), and hold no timestamps, so a rebuild gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mergelib.errors import InputModelError, OutputError
from mergelib.io.atomic import commit_dir
from mergelib.io.hashing import sha256_file
from mergelib.io.index import index_model, read_config
from mergelib.io.reader import read_tensor
from mergelib.io.writer import ShardFile, TensorSlot, shard_names, write_index

TOKENIZER_FILES = (  # what mergelib.merge copies from the donor, in the same order
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, trailing newline) so the same data gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_dir(out_dir: Path, build) -> Any:
    """Run `build(staged)` in a fresh hidden sibling of `out_dir`, then swap it in; on any error remove it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        result = build(staged)
        commit_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return result


def collect_tokenizer(model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Copy the merged model's tokenizer files to `out_dir` after checking they load and fit its embeddings."""
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not present:
        raise InputModelError(f"{model_dir}: no tokenizer files; merge with copy_tokenizer or set tokenizer_source")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InputModelError(f"{model_dir}: the tokenizer does not load ({str(exc).splitlines()[0]})") from None
    vocab = read_config(model_dir).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise InputModelError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model embeds {vocab}; "
            "use a tokenizer_source whose vocabulary fits"
        )
    report = {
        "source": "copied by the merge engine from the tokenizer donor",
        "tokens": len(tokenizer),
        "model_vocab_size": vocab,
        "files": {name: sha256_file(model_dir / name) for name in present},
    }

    def build(staged: Path) -> None:
        for name in present:
            shutil.copyfile(model_dir / name, staged / name)
        write_json(staged / "tokenizer_report.json", report)

    build_dir(out_dir, build)
    return report


def export_safetensors(model_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, dtype: str,
                       shard_size: int) -> dict[str, Any]:
    """Re-save a model as safetensors shards in `dtype` (floating tensors cast, others kept) with its tokenizer."""
    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise OutputError(f"export.dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    index = index_model(model_dir)
    slots: list[list[TensorSlot]] = [[]]
    used = 0
    for name in sorted(index.tensors):
        info = index.tensors[name]
        out_dtype = DTYPES[dtype] if info.dtype.is_floating_point else info.dtype
        slot = TensorSlot(name, info.shape, out_dtype)
        if slots[-1] and used + slot.nbytes > shard_size:
            slots.append([])
            used = 0
        slots[-1].append(slot)
        used += slot.nbytes
    shards = dict(zip(shard_names(len(slots)), slots))
    config = read_config(model_dir)
    config["dtype" if "dtype" in config else "torch_dtype"] = dtype

    def build(staged: Path) -> None:
        for fname, group in shards.items():
            shard = ShardFile(staged / fname, group, {"format": "pt"})
            try:
                for slot in group:
                    shard.write(slot.name, read_tensor(slot.name, index.tensors[slot.name]).to(slot.dtype))
            finally:
                shard.close()
        write_index(staged, shards, {})
        write_json(staged / "config.json", config)
        for source in (model_dir / "generation_config.json", *sorted(tokenizer_dir.iterdir())):
            if source.is_file() and source.name != "tokenizer_report.json":
                shutil.copyfile(source, staged / source.name)

    build_dir(out_dir, build)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    return {
        "dtype": dtype,
        "shards": len(shards),
        "bytes": sum(p.stat().st_size for p in files),
        "files": {p.name: sha256_file(p) for p in files},
    }


def publish(export_dir: str | Path, out_dir: str | Path, target: str, repo_id: str | None = None,
            revision: str = "main", private: bool = True) -> dict[str, Any]:
    """Write `out_dir/manifest.json` (what is or would be uploaded); with target 'hub', upload to `repo_id`."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if not export_dir.is_dir():
        raise InputModelError(f"{export_dir}: nothing to publish; run the export stage first")
    files = sorted(p for p in export_dir.iterdir() if p.is_file())
    manifest: dict[str, Any] = {
        "target": target,
        "repo_id": repo_id,
        "revision": revision,
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    if target == "hub":
        manifest["commit"] = _upload(export_dir, repo_id, revision, private)
    build_dir(out_dir, lambda staged: write_json(staged / "manifest.json", manifest))
    return manifest


def _upload(export_dir: Path, repo_id: str | None, revision: str, private: bool) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import HfHubHTTPError

    if HF_HUB_OFFLINE:
        raise OutputError("publish=hub: HF_HUB_OFFLINE is set; unset it (and log in) to upload, or use publish=none")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, revision=revision,
                                 commit_message="Upload merged model (mergelib)")
    except HfHubHTTPError as exc:
        raise OutputError(f"publish.repo_id '{repo_id}': upload failed ({str(exc).splitlines()[0]})") from None
    return info.oid
