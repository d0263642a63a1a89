"""A loopback stand-in for the Hugging Face Hub: the endpoints huggingface_hub uses to create a repo, commit
files, tag, list refs and files, read model info and download. Standard library only, in memory.

Every preupload answer says `regular`, so file bytes arrive base64-inline in the commit's NDJSON and no LFS or
Xet transfer is needed. Writes need a bearer token from `tokens`; `fail_commits` makes the next commits fail
with HTTP 500 (to test that a failed upload leaves nothing behind).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


class FakeHub:
    """The server's state plus its lifecycle; `url` is the endpoint to hand to huggingface_hub."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_fake_token",), user: str = "tester"):
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.fail_commits = 0
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fakehub")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def new_commit(self, repo: Repo, files: dict[str, bytes], parent: str | None, message: str) -> str:
        digest = hashlib.sha1(json.dumps([parent, message, time.time_ns()]).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, files, parent, message)
        return oid


def _card_data(readme: bytes | None) -> dict:
    if not readme:
        return {}
    match = re.match(rb"^---\s*\n(.*?)\n---\s*\n", readme, re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # ---------------------------------------------------------------- plumbing
        def _send(self, status: int, body: object = None, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer ") and auth[len("Bearer "):] in hub.tokens:
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        def _route(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            hub.requests.append((self.command, path))
            with hub.lock:
                for method, pattern, handler in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if match and method == self.command:
                        return handler(self, query, *match.groups())
            self._error(404, f"no route {self.command} {path}")

        do_GET = do_POST = do_HEAD = do_DELETE = _route

        # ---------------------------------------------------------------- endpoints
        def whoami(self, query) -> None:
            if self._authorized():
                self._send(200, {"type": "user", "name": hub.user, "orgs": [], "auth": {"type": "access_token"}})

        def create_repo(self, query) -> None:
            if not self._authorized():
                return
            payload = json.loads(self._body() or b"{}")
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(repo_id, payload.get("private", payload.get("visibility") == "private"))
            repo.branches["main"] = hub.new_commit(repo, {".gitattributes": GITATTRIBUTES}, None, "initial commit")
            hub.repos[repo_id] = repo
            self._send(200, {"url": url, "name": repo_id})

        def validate_yaml(self, query) -> None:
            self._body()
            self._send(200, {"errors": [], "warnings": []})

        def preupload(self, query, repo_id, rev) -> None:
            if not self._authorized() or not (repo := self._repo(repo_id)):
                return
            payload = json.loads(self._body() or b"{}")
            if repo.resolve(rev) is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in payload.get("files", [])]
            self._send(200, {"files": files, "commitOid": repo.resolve(rev)})

        def commit(self, query, repo_id, rev) -> None:
            if not self._authorized() or not (repo := self._repo(repo_id)):
                return
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if hub.fail_commits:
                hub.fail_commits -= 1
                return self._error(500, "simulated storage failure")
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.branches[rev]
            header = next((item["value"] for item in lines if item["key"] == "header"), {})
            if header.get("parentCommit") not in (None, head):
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "only base64 inline files are supported")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif item["key"] != "header":
                    return self._error(400, f"unsupported commit operation {item['key']}")
            oid = hub.new_commit(repo, files, head, header.get("summary", ""))
            repo.branches[rev] = oid
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None, "success": True})

        def create_tag(self, query, repo_id, rev) -> None:
            if not self._authorized() or not (repo := self._repo(repo_id)):
                return
            tag = json.loads(self._body() or b"{}")["tag"]
            target = repo.resolve(rev)
            if target is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if tag in repo.tags or tag in repo.branches:
                return self._error(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = target
            self._send(200, {})

        def delete_tag(self, query, repo_id, tag) -> None:
            if not self._authorized() or not (repo := self._repo(repo_id)):
                return
            if repo.tags.pop(tag, None) is None:
                return self._error(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            self._send(200, {})

        def create_branch(self, query, repo_id, branch) -> None:
            if not self._authorized() or not (repo := self._repo(repo_id)):
                return
            payload = json.loads(self._body() or b"{}")
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(payload.get("startingPoint") or "main")
            self._send(200, {})

        def refs(self, query, repo_id) -> None:
            if not (repo := self._repo(repo_id)):
                return

            def listing(refs: dict[str, str], kind: str) -> list[dict]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(refs.items())]

            body = {"branches": listing(repo.branches, "heads"), "tags": listing(repo.tags, "tags"), "converts": []}
            if query.get("include_prs"):
                body["pullRequests"] = []
            self._send(200, body)

        def model_info(self, query, repo_id, rev=None) -> None:
            if not (repo := self._repo(repo_id)):
                return
            sha = repo.resolve(rev or "main")
            if sha is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = repo.commits[sha].files
            card = _card_data(files.get("README.md"))
            self._send(200, {
                "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "tags": list(card.get("tags") or []), "cardData": card,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            })

        def tree(self, query, repo_id, rev, prefix=None) -> None:
            if not (repo := self._repo(repo_id)):
                return
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            base = (prefix or "").strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, folders = [], set()
            for path, data in sorted(repo.commits[sha].files.items()):
                if base and not path.startswith(base + "/"):
                    continue
                rest = path[len(base) + 1:] if base else path
                if not recursive and "/" in rest:
                    folders.add((base + "/" if base else "") + rest.split("/")[0])
                    continue
                entries.append({"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                                "path": path})
            if recursive:  # every folder below `base` that holds a listed file
                for entry in entries:
                    parts = entry["path"].split("/")
                    folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
                folders = {f for f in folders if not base or f.startswith(base + "/")}
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders) if f]
            self._send(200, entries)

        def resolve(self, query, repo_id, rev, path) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            data = repo.commits[sha].files.get(path)
            if data is None:
                return self._error(404, f"Entry not found: {path}", "EntryNotFound")
            etag = hashlib.sha256(data).hexdigest()
            self._send(200, raw=data, headers={"X-Repo-Commit": sha, "ETag": f'"{etag}"'})

    repo = r"([^/]+/[^/]+)"
    ROUTES = [
        ("GET", r"/api/whoami-v2", Handler.whoami),
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", rf"/api/models/{repo}/preupload/(.+)", Handler.preupload),
        ("POST", rf"/api/models/{repo}/commit/(.+)", Handler.commit),
        ("POST", rf"/api/models/{repo}/tag/(.+)", Handler.create_tag),
        ("DELETE", rf"/api/models/{repo}/tag/(.+)", Handler.delete_tag),
        ("POST", rf"/api/models/{repo}/branch/(.+)", Handler.create_branch),
        ("GET", rf"/api/models/{repo}/refs", Handler.refs),
        ("GET", rf"/api/models/{repo}/tree/([^/]+)(?:/(.*))?", Handler.tree),
        ("GET", rf"/api/models/{repo}/revision/(.+)", Handler.model_info),
        ("GET", rf"/api/models/{repo}", Handler.model_info),
        ("GET", rf"/{repo}/resolve/([^/]+)/(.+)", Handler.resolve),
        ("HEAD", rf"/{repo}/resolve/([^/]+)/(.+)", Handler.resolve),
    ]
    return Handler
