"""Fetch the input models and pin them: a lock file with each model's resolved commit and the sha256 of its files.

Hub ids go through `mergelib.io.hub.resolve_model` (huggingface_hub.snapshot_download; HF_HUB_OFFLINE=1 reads the
cache only); local directories are hashed in place; a built family is made here: the trained demo family
(mergelib.families.demo) or the seeded tiny one (mergelib.families.tiny). The merge stage reads the lock, so a rebuild
reads the same commit and checks it reads the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergelib.config.recipe import ModelRef
from mergelib.config.run import BUILT_FAMILIES, ModelsConfig
from mergelib.config.textfile import read_json
from mergelib.errors import InputModelError
from mergelib.io.hashing import hash_model_dir
from mergelib.io.hub import is_hub_id, resolve_model
from mergelib.merging.versions import TRAINING_LIBRARIES, package_versions
from mergelib.pipeline.outputs import build_dir, write_json

LOCK_NAME = "lock.json"
LOCK_VERSION = 1


@dataclass(frozen=True)
class LockedModel:
    """One input model as fetched."""

    ref: str  # as written in conf/ (`org/name@rev`, a directory)
    kind: str  # demo | local | hub
    engine_ref: str  # what the merge reads: the directory, or `org/name@<commit sha>`
    path: str  # the directory holding the bytes
    revision: str | None = None  # resolved commit sha (hub)
    files: dict[str, str] = field(default_factory=dict)  # path inside the model -> sha256


def _display(path: Path) -> str:
    """A path relative to the working directory when inside it (so records do not depend on the checkout)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def _fetch_one(ref: str) -> LockedModel:
    parsed = ModelRef.parse(ref)
    if Path(parsed["path"]).expanduser().is_dir() and parsed["revision"] is None:
        path = Path(parsed["path"]).expanduser()
        return LockedModel(ref, "local", ref, _display(path), None, hash_model_dir(path))
    if not is_hub_id(parsed["path"]):
        raise InputModelError(f"model '{ref}': no such directory, and not a Hub id (org/name[@revision])")
    path = resolve_model(parsed["path"], parsed["revision"])
    sha = path.name if path.parent.name == "snapshots" else parsed["revision"]
    return LockedModel(ref, "hub", f"{parsed['path']}@{sha}", str(path), sha, hash_model_dir(path))


def fetch_inputs(
    refs: Sequence[str], out_dir: str | Path, models: ModelsConfig | None = None
) -> dict[str, LockedModel]:
    """Fetch every model in `refs` and write `out_dir/lock.json`; `out_dir` is replaced only when all succeed.

    When `models` is a built family (demo, tiny), its references are built into `out_dir` instead of looked up.
    """
    out_dir = Path(out_dir)
    built = models is not None and models.source in BUILT_FAMILIES
    family_refs = set(models.refs()) if built else set()
    locked: dict[str, LockedModel] = {}
    missing: list[str] = []
    for ref in refs:
        if ref in family_refs:
            continue
        try:
            locked[ref] = _fetch_one(ref)
        except InputModelError as exc:
            missing.append(str(exc))
    if missing:
        more = f" (and {len(missing) - 1} more: {'; '.join(missing[1:])})" if len(missing) > 1 else ""
        raise InputModelError(missing[0] + more)

    def build(staged: Path) -> None:
        if family_refs:
            locked.update(_build_demo(models, staged))
        _write_lock(staged / LOCK_NAME, [locked[r] for r in refs])

    build_dir(out_dir, build)
    return {r: locked[r] for r in refs}


def _build_demo(models: ModelsConfig, staged: Path) -> dict[str, LockedModel]:
    if models.source == "demo":
        from mergelib.families.demo import build_demo_family

        # one torch thread (the library's default): the same bytes on every machine, and fastest on shared cores
        family = build_demo_family(staged, seed=models.seed, quick=models.quick, skills=models.skills())
    elif models.source == "smollm2":
        from mergelib.families.smollm2 import build_smollm2_family

        family = build_smollm2_family(staged, seed=models.seed, steps=60 if models.quick else 200,
                                      skills=models.skills())
    else:
        from mergelib.families.tiny import make_family

        family = make_family(staged, size=models.size, n_finetunes=len(models.finetunes), seed=models.seed)
    # RunConfig checked that the refs are out_dir/base, then out_dir/ft1.. (tiny) or out_dir/ft_<skill> (demo)
    return {
        ref: LockedModel(ref, "demo", ref, ref, None, hash_model_dir(built))
        for ref, built in zip(models.refs(), (family.base, *family.finetunes))
    }


def _write_lock(path: Path, models: list[LockedModel]) -> None:
    write_json(path, {"version": LOCK_VERSION, "models": [asdict(m) for m in models],
                      "libraries": package_versions(TRAINING_LIBRARIES)})  # what built or read these bytes


def read_lock(path: str | Path) -> dict[str, LockedModel]:
    """The models a fetch locked, by their conf/ reference."""
    path = Path(path)
    if not path.exists():
        raise InputModelError(f"{path}: no lock file; run the fetch stage first (`dvc repro fetch`)")
    body = read_json(path, "the lock file", InputModelError, "run the fetch stage again")
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise InputModelError(f"{path}: not a lock file written by the fetch stage; run the fetch stage again")
    if body.get("version") != LOCK_VERSION:
        raise InputModelError(f"{path}: lock version {body.get('version')} is not {LOCK_VERSION}; run fetch again")
    try:
        return {m["ref"]: LockedModel(**m) for m in body["models"]}
    except (TypeError, KeyError):
        raise InputModelError(f"{path}: a model entry is malformed; run the fetch stage again") from None


def pinned_refs(lock: dict[str, LockedModel], refs: Sequence[str], lock_path: str | Path) -> dict[str, str]:
    """conf/ reference -> what the engine reads, after checking every locked file still has its sha256."""
    out = {}
    for ref in refs:
        if ref not in lock:
            raise InputModelError(
                f"model '{ref}' is not in {lock_path}: the config changed since the fetch; run `dvc repro fetch`"
            )
        model = lock[ref]
        actual = hash_model_dir(Path(model.path)) if Path(model.path).is_dir() else {}
        changed = sorted(k for k, v in model.files.items() if actual.get(k) != v)
        if changed:
            raise InputModelError(
                f"model '{ref}': {model.path}/{changed[0]} is missing or changed since it was fetched "
                f"({len(changed)} file(s)); run `dvc repro -f fetch`"
            )
        out[ref] = model.engine_ref
    return out
