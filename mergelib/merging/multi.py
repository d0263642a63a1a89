"""Multi-document recipes (mergekit-multi): later documents use earlier ones' outputs as models, by `name:`.

The documents form a DAG run in dependency order (ties in document order). A named stage is merged into
`<intermediate>/<name>` and reused while its key is unchanged: the sha256 of its recipe (stage references replaced
by those stages' keys), its other inputs' file hashes, the seed, the options that change bytes and the library
versions. The final document (the unnamed one, else the last) is merged into OUT. mergekit-semantics.md 2(b):
mergekit reuses a stage whenever its files exist, stale or not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelib.config.recipe import MergeRecipe, load_recipes
from mergelib.errors import RecipeError, did_you_mean
from mergelib.io.atomic import MARKER
from mergelib.io.hashing import sha256_files
from mergelib.io.hub import is_hub_id
from mergelib.io.journal import plan_key
from mergelib.merging.api import MergeResult, library_versions, merge, plan_merge

STAGE_FILE = "mergelib_stage.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-document recipe."""

    document: int  # 1-based, for messages
    name: str | None
    recipe: MergeRecipe
    deps: tuple[str, ...]  # names of the stages it reads, in first-use order


@dataclass(frozen=True)
class StageRun:
    """What happened to one stage."""

    name: str | None
    out_dir: Path
    key: str  # "" when it could not be computed yet (dry run downstream of a stage that would run)
    reused: bool
    result: MergeResult | None  # None when reused, or in a dry run downstream of a stage that would run


@dataclass(frozen=True)
class MultiResult:
    """Every stage in run order; the last is the final document, written to OUT."""

    stages: tuple[StageRun, ...]

    @property
    def final(self) -> StageRun:
        return self.stages[-1]


def _walk(value: Any, visit) -> Any:
    """`value` with every model reference (a dict of path/revision/lora) replaced by `visit(ref)`."""
    if isinstance(value, dict):
        if "path" in value and set(value) <= {"path", "revision", "lora"}:
            return visit(value)
        return {k: _walk(v, visit) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, visit) for v in value]
    return value


def _dump(recipe: MergeRecipe) -> dict:
    return recipe.model_dump(mode="json", exclude_none=True)


def _references(recipe: MergeRecipe) -> list[str]:
    """Every model path the recipe names, in order (tokenizer_source strings included)."""
    found: list[str] = []
    _walk(_dump(recipe), lambda ref: found.append(ref["path"]) or ref)
    for text in (recipe.tokenizer_source, recipe.tokenizer.source if recipe.tokenizer else None):
        if text is not None:
            found.append(text)
    return found


def stage_graph(recipes: list[MergeRecipe]) -> list[Stage]:
    """The documents as stages in run order; RecipeError for a duplicate or unsafe name, a reference to an
    unknown name, a cycle, or more than one unnamed document."""
    names: dict[str, int] = {}
    unnamed = []
    for i, recipe in enumerate(recipes, 1):
        if recipe.name is None:
            unnamed.append(i)
        elif not NAME.match(recipe.name):
            raise RecipeError(f"document {i}: name '{recipe.name}' must be letters, digits, '.', '_' or '-' "
                              "(it names a directory)")
        elif recipe.name in names:
            raise RecipeError(f"document {i}: name '{recipe.name}' is already document {names[recipe.name]}")
        else:
            names[recipe.name] = i
    if len(unnamed) > 1:
        raise RecipeError(f"documents {', '.join(map(str, unnamed))} have no name; only the final one may be "
                          "unnamed (give the others a 'name:')")
    final = unnamed[0] if unnamed else len(recipes)
    stages = []
    for i, recipe in enumerate(recipes, 1):
        deps: list[str] = []
        for ref in _references(recipe):
            if ref in names:
                if ref not in deps:
                    deps.append(ref)
            elif _looks_like_a_name(ref):
                raise RecipeError(
                    f"document {i}: '{ref}' is neither a model directory nor the name of a document"
                    f"{did_you_mean(ref, names)}; names: {', '.join(names) or 'none'}"
                )
        stages.append(Stage(i, recipe.name, recipe, tuple(deps)))
    final_name = recipes[final - 1].name
    users = [s.document for s in stages if final_name is not None and final_name in s.deps]
    if users:
        raise RecipeError(f"document {final} ('{final_name}') is the final output but document {users[0]} uses it; "
                          "put the final document last or leave it unnamed")
    order = _topological([s for s in stages if s.document != final])
    return order + [stages[final - 1]]


def _looks_like_a_name(ref: str) -> bool:
    """Neither a local path nor a Hub id (nor a tokenizer_source keyword): meant as a stage name."""
    return ref not in ("base", "union") and not Path(ref).expanduser().exists() and not is_hub_id(ref)


def _topological(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages if s.name is not None}
    state: dict[int, str] = {}  # document -> "visiting" | "done"
    order: list[Stage] = []

    def visit(stage: Stage, path: list[str]) -> None:
        if state.get(stage.document) == "done":
            return
        if state.get(stage.document) == "visiting":
            cycle = path[path.index(stage.name):] + [stage.name]
            raise RecipeError(f"the documents form a cycle: {' -> '.join(cycle)}; a stage cannot use its own output")
        state[stage.document] = "visiting"
        for dep in stage.deps:
            visit(by_name[dep], path + [stage.name])
        state[stage.document] = "done"
        order.append(stage)

    for stage in stages:
        visit(stage, [])
    return order


def _resolved(stage: Stage, where: dict[str, str]) -> MergeRecipe:
    """The stage's recipe with each stage name replaced by `where[name]` (a directory, or a key placeholder)."""

    def visit(ref: dict) -> dict:
        if ref["path"] not in where:
            return ref
        if ref.get("revision"):
            raise RecipeError(f"document {stage.document}: '{ref['path']}@{ref['revision']}' names a stage; "
                              "stages have no revisions")
        return {**ref, "path": where[ref["path"]]}

    data = _walk(_dump(stage.recipe), visit)
    for key, holder in (("tokenizer_source", data), ("source", data.get("tokenizer") or {})):
        if holder.get(key) in where:
            holder[key] = where[holder[key]]
    return MergeRecipe.model_validate(data)


def stage_key(stage: Stage, keys: dict[str, str], dirs: dict[str, str], *, seed: int, options: dict) -> str:
    """The content hash that decides a stage's output (see the module docstring)."""
    hashed = _resolved(stage, {name: f"mergelib-stage:{name}:{key}" for name, key in keys.items()})
    plan = plan_merge(_resolved(stage, dirs), **{k: options[k] for k in (
        "out_shard_size", "dtype", "allow_crimes", "trust_remote_code", "allow_nan", "unsafe_truncate_embeddings")})
    stage_dirs = {str(Path(d).resolve()) for d in dirs.values()}
    files = [f for m in plan.models if str(m.path.resolve()) not in stage_dirs
             for f in (*m.index.files, m.path / "config.json") if f.is_file()]
    digests = sha256_files(files)
    byte_options = {k: options[k] for k in ("out_shard_size", "dtype", "copy_tokenizer")}
    parts = [hashed.to_yaml(), str(seed), json.dumps(byte_options, sort_keys=True),
             json.dumps(library_versions(), sort_keys=True)]
    parts += sorted(f"{f}|{digests[str(f)]}" for f in files)
    return plan_key(parts)


def _current(stage_dir: Path, key: str) -> bool:
    try:
        recorded = json.loads((stage_dir / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("key") == key and (stage_dir / MARKER).is_file() and (stage_dir / "config.json").is_file()


def merge_multi(
    source: str | Path | list[MergeRecipe],
    out_dir: str | Path,
    *,
    intermediate_dir: str | Path | None = None,
    seed: int = 0,
    dry_run: bool = False,
    out_shard_size: int = 5_000_000_000,
    threads: int | None = None,
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = False,
    dtype: str | None = None,
    memory_budget: int | None = None,
    allow_nan: bool = False,
    unsafe_truncate_embeddings: bool = False,
    executor: str = "local",
    workers: int | None = None,
    device: str = "cpu",
    read_to_gpu: bool = False,
    multi_gpu: bool = False,
) -> MultiResult:
    """Run every document of a multi-document recipe; named stages go to `intermediate_dir/<name>` (default: the
    sibling `<OUT>.intermediate`) and are reused while their key is unchanged; the final document goes to OUT."""
    recipes = source if isinstance(source, list) else load_recipes(source)
    out_dir = Path(out_dir)
    inter = Path(intermediate_dir or out_dir.with_name(out_dir.name + ".intermediate"))
    stages = stage_graph(recipes)
    options = dict(out_shard_size=out_shard_size, dtype=dtype, allow_crimes=allow_crimes,
                   trust_remote_code=trust_remote_code, allow_nan=allow_nan, copy_tokenizer=copy_tokenizer,
                   unsafe_truncate_embeddings=unsafe_truncate_embeddings)
    run_options = dict(options, threads=threads, quiet=quiet, memory_budget=memory_budget, seed=seed,
                       executor=executor, workers=workers, device=device, read_to_gpu=read_to_gpu,
                       multi_gpu=multi_gpu)
    keys: dict[str, str] = {}
    dirs: dict[str, str] = {}
    runs: list[StageRun] = []
    pending: set[str] = set()  # dry run: stages that would run, so their outputs do not exist yet
    for i, stage in enumerate(stages):
        final = i == len(stages) - 1
        target = out_dir if final else inter / stage.name
        if any(dep in pending for dep in stage.deps):
            pending.add(stage.name or "")
            runs.append(StageRun(stage.name, target, "", False, None))
            continue
        key = stage_key(stage, keys, dirs, seed=seed, options=options)
        if not final and _current(target, key):
            runs.append(StageRun(stage.name, target, key, True, None))
        elif dry_run:
            result = merge(_resolved(stage, dirs), target, dry_run=True, **run_options)
            pending.add(stage.name or "")
            runs.append(StageRun(stage.name, target, key, False, result))
        else:
            result = merge(_resolved(stage, dirs), target, **run_options)
            if not final:
                (target / STAGE_FILE).write_text(json.dumps({"name": stage.name, "key": key}, indent=2) + "\n")
            runs.append(StageRun(stage.name, target, key, False, result))
        if stage.name is not None:
            keys[stage.name] = key
            dirs[stage.name] = str(target.resolve())
    return MultiResult(tuple(runs))
