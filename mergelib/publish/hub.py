"""Publish a merged model (and chosen exports) to the Hugging Face Hub as one commit, then tag it.

Order matters for the guarantees: the tag is checked before anything is uploaded (a taken tag is refused, never
moved), the files go up in a single commit on top of the branch head the check saw, and the tag is created only
after that commit succeeded, so a failed upload leaves no tag. The token comes from huggingface_hub's usual
sources (HF_TOKEN, `hf auth login`) unless one is given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergelib.publish.errors import PublishError

SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    local: Path | None  # None: `content` is uploaded instead (the generated model card)
    size: int
    content: bytes | None = None


@dataclass(frozen=True)
class PublishPlan:
    """What a publish uploads and how it tags it; a dry run returns this without touching the network."""

    repo_id: str
    tag: str
    revision: str
    files: tuple[UploadFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        """Lines a dry run prints: the target, then one line per file."""
        lines = [f"would upload {len(self.files)} files ({self.bytes / 1e6:.1f} MB) to {self.repo_id}@{self.revision} "
                 f"and tag it {self.tag}:"]
        lines += [f"  {f.path_in_repo}  ({f.size} bytes)" for f in self.files]
        return "\n".join(lines)


@dataclass(frozen=True)
class PublishResult:
    """A finished publish: the commit and the tag that points to it."""

    repo_id: str
    tag: str
    commit: str
    commit_url: str
    files: tuple[str, ...]


def tag_for(tag: str | None, version: str | None) -> str:
    """`tag` as given, else `v<version>` (a semantic version); either checked to be a valid tag name."""
    if tag is None:
        if version is None:
            raise PublishError("publish: give a version (semver, e.g. 1.2.0) or a tag name to publish under")
        if not SEMVER.match(version.removeprefix("v")):
            raise PublishError(f"publish version '{version}': not a semantic version like 1.2.0")
        tag = f"v{version.removeprefix('v')}"
    if not TAG.match(tag) or ".." in tag or tag.endswith((".", ".lock")):
        raise PublishError(f"publish tag '{tag}': use letters, digits and . _ + - (e.g. v1.2.0)")
    return tag


def _files_under(root: Path, prefix: str) -> list[UploadFile]:
    if root.is_file():
        return [UploadFile(f"{prefix}{root.name}", root, root.stat().st_size)]
    return [UploadFile(prefix + str(p.relative_to(root)), p, p.stat().st_size) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def plan_publish(model_dir: str | Path, repo_id: str, *, tag: str | None = None, version: str | None = None,
                 exports: Sequence[str | Path] = (), card: str | None = None, revision: str = "main") -> PublishPlan:
    """The files of `model_dir` at the repo root, each export (file or directory) under its own name next to
    them, and `card` as README.md when given."""
    model_dir = Path(model_dir)
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"publish repo_id '{repo_id}': expected namespace/name, e.g. you/merged-model")
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir}: no model directory to publish; run the merge first")
    files = _files_under(model_dir, "")
    for export in map(Path, exports):
        if not export.exists():
            raise PublishError(f"{export}: export not found; run the export stage first or drop it from exports")
        files += _files_under(export, f"{export.name}/" if export.is_dir() else "")
    if card is not None:
        data = card.encode()
        files = [f for f in files if f.path_in_repo != "README.md"] + [UploadFile("README.md", None, len(data), data)]
    seen: set[str] = set()
    for f in files:
        if f.path_in_repo in seen:
            raise PublishError(f"publish: two files would land at '{f.path_in_repo}'; rename one of the exports")
        seen.add(f.path_in_repo)
    return PublishPlan(repo_id, tag_for(tag, version), revision, tuple(sorted(files, key=lambda f: f.path_in_repo)))


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection errors of the HTTP client huggingface_hub uses (httpx2 since 2.0)."""
    try:
        import httpx2
    except ImportError:
        return ()
    return (httpx2.HTTPError,)


def _hub_error(repo_id: str, exc: Exception) -> PublishError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status is None:
        return PublishError(f"Hub {repo_id}: cannot reach the Hub ({first}); nothing was tagged")
    if status == 401:
        return PublishError(f"Hub {repo_id}: not logged in or token rejected; set HF_TOKEN or run `hf auth login`")
    if status == 403:
        return PublishError(f"Hub {repo_id}: the token may not write to this namespace; use a write token")
    return PublishError(f"Hub {repo_id}: request failed ({first}); nothing was tagged")


def publish_to_hub(model_dir: str | Path, repo_id: str, *, tag: str | None = None, version: str | None = None,
                   exports: Sequence[str | Path] = (), card: str | None = None, private: bool = True,
                   revision: str = "main", token: str | None = None, endpoint: str | None = None,
                   commit_message: str | None = None, dry_run: bool = False) -> PublishResult | PublishPlan:
    """Create `repo_id` if needed, upload the model, exports and card in one commit on `revision`, then tag that
    commit `tag` (default `v<version>`). A tag that already exists is refused before any upload. With
    `dry_run`, return the PublishPlan (print `plan.describe()`) and touch nothing."""
    plan = plan_publish(model_dir, repo_id, tag=tag, version=version, exports=exports, card=card, revision=revision)
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise PublishError("publish: HF_HUB_OFFLINE is set; unset it to upload (or use a dry run)")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        refs = api.list_repo_refs(repo_id)
        taken = {ref.name: ref.target_commit for ref in refs.tags}
        if plan.tag in taken:
            raise PublishError(f"Hub {repo_id}: tag '{plan.tag}' already exists (commit {taken[plan.tag][:12]}); "
                               "tags are never moved, publish a new version")
        heads = {ref.name: ref.target_commit for ref in refs.branches}
        if revision not in heads:
            api.create_branch(repo_id, branch=revision)
            heads = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
        operations = [CommitOperationAdd(f.path_in_repo, f.content if f.local is None else str(f.local))
                      for f in plan.files]
        commit = api.create_commit(repo_id, operations=operations, revision=revision,
                                   commit_message=commit_message or f"mergelib: publish {plan.tag}",
                                   parent_commit=heads[revision])
        api.create_tag(repo_id, tag=plan.tag, revision=commit.oid, tag_message=f"mergelib {plan.tag}")
    except (HfHubHTTPError, OfflineModeIsEnabled, *_transport_errors(), OSError) as exc:
        raise _hub_error(repo_id, exc) from None
    return PublishResult(repo_id, plan.tag, commit.oid, commit.commit_url, tuple(f.path_in_repo for f in plan.files))
