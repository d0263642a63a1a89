"""Stage publish: a dry run (publish=none), the Hub (publish=hub, token from HF_TOKEN) or the MLflow Model Registry
(publish=mlflow); each writes the model card and manifest.json to paths.publish."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline.publish_step import publish_merge
    from mergelib.pipeline.tracking import tracking_uri

    pub = config.publish
    if pub.model_name is None:
        pub = pub.model_copy(update={"model_name": f"mergelib-{config.models.name}"})
    p = config.paths
    manifest = publish_merge(pub, p.merged, p.export, p.reports, p.publish,
                             run_id=tracker.run_id if tracker.client is not None else None,
                             tracking_uri=tracking_uri())
    tracker.log_artifact(f"{p.publish}/manifest.json", "publish")
    tracker.log_markdown(f"{p.publish}/README.md", "publish", "README.md")  # without the Hub's YAML header
    n = len(manifest["files"])
    if pub.target == "none":
        return (f"dry run (publish=none): would upload {n} files to {manifest['repo_id']} and tag {manifest['tag']}; "
                f"see {p.publish}/manifest.json")
    if pub.target == "hub":
        return f"uploaded {n} files to {manifest['repo_id']}, tagged {manifest['tag']} ({manifest['commit'][:12]})"
    return (f"registered {manifest['model_name']} version {manifest['model_version']} "
            f"(alias {', '.join(manifest['aliases'])}) in {manifest['tracking_uri']}")


if __name__ == "__main__":
    main("publish", run)
