"""The Hub model card of a published merge: metadata the Hub indexes and what it takes to rebuild the model.

Front matter (huggingface_hub.ModelCardData): base_model (the Hub inputs), base_model_relation `merge`, tags
`merge`, `mergelib` and the method, license from the inputs' own cards. Body: the inputs with revisions and
sha256 of every file (from mergelib_run.json), the recipe, seed and library versions, and the evaluation and
export-check tables when given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from mergelib.io.hub import HUB_ID
from mergelib.publish.errors import PublishError

RUN_RECORD = "mergelib_run.json"
RECIPE_FILE = "mergekit_config.yml"


def read_run(model_dir: Path) -> dict:
    """mergelib_run.json of a merge output (seed, method, recipe, inputs with sha256, versions)."""
    path = Path(model_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(f"{path}: missing; publish a directory written by mergelib.merge") from None
    except ValueError as exc:
        raise PublishError(f"{path}: invalid JSON ({exc})") from None


def _card_license(readme: Path | None) -> str | None:
    from huggingface_hub.repocard import metadata_load

    if readme is None or not Path(readme).is_file():
        return None
    value = (metadata_load(readme) or {}).get("license")
    return value if isinstance(value, str) else None


def input_license(ref: str, revision: str | None) -> str | None:
    """The license an input model's own card declares: a local directory's README.md, or a Hub model's card if
    it is in the local cache (no network)."""
    local = Path(ref)
    if local.is_dir():
        return _card_license(local / "README.md")
    if HUB_ID.match(ref):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "README.md", revision=revision)
        return _card_license(Path(cached)) if isinstance(cached, str) else None
    return None


def resolve_license(licenses: Mapping[str, str | None]) -> tuple[str | None, str]:
    """(license for the metadata, a sentence for the card): one shared license, `other` when they differ."""
    known = {model: lic for model, lic in licenses.items() if lic}
    unknown = sorted(set(licenses) - set(known))
    found = sorted(set(known.values()))
    detail = "; ".join(f"{m}: {lic}" for m, lic in sorted(known.items()))
    if unknown:
        detail += ("; " if detail else "") + "no license found for " + ", ".join(unknown)
    if len(found) == 1 and not unknown:
        return found[0], f"All inputs are licensed {found[0]}."
    if not found:
        return None, f"The inputs declare no license ({detail}); check each input's terms before use."
    return "other", f"The inputs are licensed differently ({detail}); the merge is bound by all of them."


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(data: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def card_text(model_dir: str | Path, *, title: str | None = None, evaluation: Mapping | None = None,
              export_checks: Mapping[str, Mapping] | None = None, license: str | None = None,
              tags: tuple[str, ...] = ()) -> str:
    """README.md for the Hub (YAML front matter + markdown)."""
    from huggingface_hub import ModelCardData

    model_dir = Path(model_dir)
    run = read_run(model_dir)
    inputs = run.get("inputs", [])
    method = run.get("method", "merge")
    recipe_path = model_dir / RECIPE_FILE
    recipe = recipe_path.read_text() if recipe_path.is_file() else yaml.safe_dump(run.get("recipe", {}))
    if license is None:
        license, license_line = resolve_license({m["model"]: input_license(m["model"], m.get("revision"))
                                                 for m in inputs})
    else:
        license_line = f"Licensed {license} (set by the publisher)."
    all_tags = list(dict.fromkeys(("merge", "mergelib", method, *tags)))
    data = ModelCardData(
        base_model=[m["model"] for m in inputs if HUB_ID.match(m["model"])] or None,
        base_model_relation="merge",
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=all_tags,
    )
    name = title or run.get("recipe", {}).get("name") or model_dir.resolve().name
    lines = ["---", data.to_yaml(), "---", "", f"# {name}", "",
             f"A merge of {len(inputs)} models made with mergelib using **{method}**.", "",
             "## Inputs", "", "| model | revision | file | sha256 |", "|---|---|---|---|"]
    for m in inputs:
        for fname, digest in sorted(m.get("files", {}).items()):
            lines.append(f"| {m['model']} | {m.get('revision') or '-'} | {fname} | `{digest}` |")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(run.get("versions", {}).items()))
    lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```", "", "## Reproduce", "",
              f"Seed `{run.get('seed')}`; library versions: {versions}.", "", "```sh",
              f"mergelib merge {RECIPE_FILE} OUT --seed {run.get('seed')}", "```", ""]
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(_flatten(evaluation).items())]
        lines.append("")
    if export_checks:
        lines += ["## Exports", "", "Each export was loaded back with an independent reader and compared with the "
                  "merged model on fixed prompts (KL of next-token distributions, argmax agreement).", "",
                  "| export | KL(merged ‖ export) | top-1 | top-1 (clear winners) | max abs Δlogit | passed |",
                  "|---|---|---|---|---|---|"]
        for name_, c in sorted(export_checks.items()):
            lines.append(f"| {name_} | {_fmt(c.get('kl_mean'))} | {_fmt(c.get('top1'))} | "
                         f"{_fmt(c.get('top1_clear'))} | {_fmt(c.get('max_abs_logit_diff'))} | "
                         f"{_fmt(c.get('passed'))} |")
        lines.append("")
    lines += ["## License", "", license_line, ""]
    return "\n".join(lines)


def build_model_card(model_dir: str | Path, **kwargs):
    """`card_text(...)` as a huggingface_hub.ModelCard (its `.data` holds the parsed metadata)."""
    from huggingface_hub import ModelCard

    return ModelCard(card_text(model_dir, **kwargs))
