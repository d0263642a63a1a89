"""Register a merged model in the MLflow Model Registry, pointing back to the run that made it.

A version's source is the artifact URI of the model inside its run (`MlflowClient.create_model_version`);
`mlflow.register_model("runs:/...")` is not used because MLflow 3 resolves it to a LoggedModel that plain
artifact folders do not have. A release tag (v1.2.0) becomes the version tag `mergelib.tag` and an alias with the
characters MLflow forbids replaced (`v1-2-0`); like a Hub tag it is never moved to another version. Other
aliases (`champion`) move, as aliases are meant to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergelib.publish.errors import PublishError

ALIAS_BAD = re.compile(r"[^\w-]")


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version in the registry."""

    name: str
    version: str
    source: str
    run_id: str | None
    aliases: tuple[str, ...]
    tags: dict[str, str]


def alias_for_tag(tag: str) -> str:
    """An MLflow alias for a release tag: letters, digits, _ and - only (`v1.2.0` -> `v1-2-0`)."""
    alias = ALIAS_BAD.sub("-", tag)
    if re.fullmatch(r"[vV]\d+", alias) or alias.lower() == "latest":  # reserved by MLflow
        alias = f"release-{alias}"
    return alias


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def log_model_dir(model_dir: str | Path, run_id: str, *, artifact_path: str = "model",
                  tracking_uri: str | None = None) -> str:
    """Copy a model directory into run `run_id`'s artifacts; returns the artifact URI to register."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.log_artifacts(run_id, str(model_dir), artifact_path)
        return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    except MlflowException as exc:
        raise PublishError(f"MLflow run {run_id}: cannot log {model_dir} ({exc.message.splitlines()[0]})") from None


def register_model(name: str, source: str, *, run_id: str | None = None, tag: str | None = None,
                   aliases: Sequence[str] = (), tags: Mapping[str, str] | None = None,
                   description: str | None = None, tracking_uri: str | None = None) -> RegisteredVersion:
    """Create registered model `name` if needed and a new version from `source` (an artifact URI), linked to
    `run_id`; tag it, alias it (`tag`'s alias is refused if it already names a version) and mark the run."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    version_tags = {**(tags or {}), **({"mergelib.run_id": run_id} if run_id else {}),
                    **({"mergelib.tag": tag} if tag else {})}
    release = alias_for_tag(tag) if tag else None
    names = tuple(dict.fromkeys([*([release] if release else []), *aliases]))
    try:
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(name, description="Merged with mergelib")
        if release is not None:
            try:
                taken = client.get_model_version_by_alias(name, release)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
            else:
                raise PublishError(f"MLflow model '{name}': alias '{release}' already names version "
                                   f"{taken.version}; release aliases are never moved, register a new version tag")
        created = client.create_model_version(name, source, run_id=run_id, tags=version_tags,
                                              description=description)
        for alias in names:
            client.set_registered_model_alias(name, alias, created.version)
        if run_id:
            client.set_tag(run_id, "mergelib.registered_model", f"{name}/{created.version}")
    except MlflowException as exc:
        raise PublishError(f"MLflow model '{name}': {exc.message.splitlines()[0]}") from None
    return RegisteredVersion(name, str(created.version), source, run_id, names, version_tags)
