"""The publish stage's work over mergelib.publish: a dry run (publish=none), the Hub (publish=hub) or the MLflow
Model Registry (publish=mlflow). Every target writes `manifest.json` (what was or would be published, sha256 per
file) and the model card (`README.md`) into paths.publish.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mergelib.io.hashing import sha256_file
from mergelib.pipeline.outputs import build_dir, write_json

EXPORT_RECORDS = ("metrics.json", "export_report.json")  # the export stage's own reports, not artifacts
DRY_RUN_REPO = "you/merged-model"  # the would-be repository of publish=none without publish.repo_id


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def export_artifacts(export_dir: str | Path) -> list[Path]:
    """The exports (GGUF files, safetensors directories) the export stage wrote, without its reports."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        return []
    return sorted(p for p in export_dir.iterdir() if p.name not in EXPORT_RECORDS and not p.name.startswith("."))


def model_card(merged_dir: str | Path, export_dir: str | Path, reports_dir: str | Path) -> str:
    """README.md for the merge: mergelib.publish.card_text with the evaluation and the export checks."""
    from mergelib.publish import card_text

    evaluation = _json(Path(reports_dir) / "metrics.json").get("merged") or None
    checks = _json(Path(export_dir) / "metrics.json") or None
    return card_text(merged_dir, evaluation=evaluation, export_checks=checks)


def publish_merge(config, merged_dir: str | Path, export_dir: str | Path, reports_dir: str | Path,
                  out_dir: str | Path, *, run_id: str | None = None,
                  tracking_uri: str | None = None) -> dict[str, Any]:
    """Publish per `config` (a PublishConfig) and write manifest.json + README.md to `out_dir`; returns the
    manifest."""
    from mergelib.publish import PublishError, log_model_dir, plan_publish, publish_to_hub, register_model

    merged_dir = Path(merged_dir)
    exports = export_artifacts(export_dir) if config.exports else []
    card = model_card(merged_dir, export_dir, reports_dir)
    repo_id = config.repo_id or DRY_RUN_REPO
    plan = plan_publish(merged_dir, repo_id, tag=config.tag, version=config.version, exports=exports, card=card,
                        revision=config.revision)
    manifest: dict[str, Any] = {
        "target": config.target,
        "tag": plan.tag,
        "files": {f.path_in_repo: {"bytes": f.size, "sha256": sha256_file(f.local) if f.local else hashlib.sha256(f.content).hexdigest()}
                  for f in plan.files},
    }
    if config.target in ("none", "hub"):
        manifest.update(repo_id=repo_id, revision=config.revision)
    if config.target == "hub":
        result = publish_to_hub(merged_dir, repo_id, tag=config.tag, version=config.version, exports=exports,
                                card=card, private=config.private, revision=config.revision)
        manifest.update(commit=result.commit, commit_url=result.commit_url)
    elif config.target == "mlflow":
        if run_id is None:
            raise PublishError("publish=mlflow: MLflow tracking is off (MERGELIB_TRACKING=off); turn it on to "
                               "register the model, or use publish=none")
        name = config.model_name or "mergelib-merge"
        source = log_model_dir(merged_dir, run_id, tracking_uri=tracking_uri)
        version = register_model(name, source, run_id=run_id, tag=plan.tag, aliases=config.aliases,
                                 tracking_uri=tracking_uri, description=card.split("\n# ", 1)[-1].split("\n")[0])
        manifest.update(model_name=version.name, model_version=version.version, source=version.source,
                        aliases=list(version.aliases), tracking_uri=tracking_uri)

    def build(staged: Path) -> None:
        (staged / "README.md").write_text(card)
        write_json(staged / "manifest.json", manifest)

    build_dir(Path(out_dir), build)
    return manifest
