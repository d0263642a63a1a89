"""The model card (README.md) written next to every merge: recipe, inputs and their sha256, seed, versions."""

from __future__ import annotations

import yaml

from mergelib.merging.plan import MergePlan


def calibration_record(plan: MergePlan) -> dict:
    """The calibration settings and, per input model, the statistics used (cache key or file sha256)."""
    calibration = plan.recipe.calibration.model_dump(mode="json", exclude_none=True)
    store = plan.statistics
    return {
        **calibration,
        "kind": store.kind,
        "flow": plan.method.statistics_flow,
        "statistics": {m.label: {"file": store.files[i].name, "digest": store.digests.get(i, "")}
                       for i, m in enumerate(plan.models)},
    }


def model_card(plan: MergePlan, *, seed: int, input_hashes: dict[str, dict[str, str]], versions: dict[str, str]) -> str:
    """Markdown with YAML front matter (base_model, tags) that the Hub renders."""
    method = plan.method
    labels = [m.label for m in plan.models]
    front = {
        "base_model": labels,
        "library_name": "transformers",
        "tags": ["merge", "mergelib", method.name],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {plan.recipe.name or 'Merged model'}",
        "",
        f"This model was merged with mergelib using **{method.name}**: {method.summary}"
        + (f" ([paper]({method.paper}))" if method.paper else "") + ".",
        "",
        "## Inputs",
        "",
        "| model | revision | file | sha256 |",
        "|---|---|---|---|",
    ]
    for model in plan.models:
        for fname, digest in sorted(input_hashes.get(model.label, {}).items()):
            lines.append(f"| {model.label} | {model.ref.revision or '-'} | {fname} | `{digest}` |")
    notes = plan.dequantised_notes()
    if notes:
        lines += ["", "Quantised inputs were dequantised on read, so this is a merge of dequantised weights:", ""]
        lines += [f"- {note}" for note in notes]
    if plan.transplanted:
        lines += ["", "Inputs whose vocabulary differed from the donor's were given its tokenizer before merging "
                  "(`tokenizer.transplant`):", ""]
        lines += [f"- {note}" for note in plan.transplanted]
    if plan.statistics is not None:
        record = calibration_record(plan)
        lines += ["", f"Statistics ({record['kind']}) from calibration: "
                  + ", ".join(f"{k} {v}" for k, v in record.items() if k in ("data", "tokens", "seed",
                                                                            "sequence_length")), ""]
        lines += [f"- {label}: `{entry['digest']}`" for label, entry in record["statistics"].items()]
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        plan.recipe.to_yaml().rstrip(),
        "```",
        "",
        "## Reproduce",
        "",
        f"Seed: `{seed}`. Library versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        + ".",
        "",
        "```sh",
        f"mergelib merge mergekit_config.yml OUT --seed {seed}",
        "```",
        "",
    ]
    return "\n".join(lines)
