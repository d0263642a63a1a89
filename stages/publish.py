"""Stage publish: upload the export (publish=hub) or only write what would be uploaded (publish=none)."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline_steps import publish

    pub = config.publish
    manifest = publish(config.paths.export, config.paths.publish, pub.target, pub.repo_id, pub.revision,
                       pub.private)
    tracker.log_artifact(f"{config.paths.publish}/manifest.json", "publish")
    if pub.target == "none":
        return f"nothing uploaded (publish=none); {len(manifest['files'])} files listed in {config.paths.publish}"
    return f"uploaded {len(manifest['files'])} files to {pub.repo_id}@{pub.revision} ({manifest['commit'][:12]})"


if __name__ == "__main__":
    main("publish", run)
