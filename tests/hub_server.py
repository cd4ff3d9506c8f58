"""A Hub-compatible HTTP server on 127.0.0.1, for tests that drive the real huggingface_hub client.

Written against huggingface_hub 2.4. It implements the endpoints behind `create_repo`,
`repo_info`/`model_info`, `list_repo_tree`, `list_repo_refs`, `create_branch`, `upload_file`,
`upload_folder`, `create_commit`, `hf_hub_download`, `snapshot_download` and `whoami`:

    GET      /api/whoami-v2
    POST     /api/validate-yaml                      (README.md metadata: always valid)
    POST     /api/repos/create                       {"name", "organization", "type", "visibility"}
    GET      /api/{type}s/{repo_id}                  repo info at "main": sha, private, siblings
    GET      /api/{type}s/{repo_id}/revision/{rev}   repo info at a branch or commit
    GET      /api/{type}s/{repo_id}/tree/{rev}[/{path}]?recursive=true   one page, no Link header
    GET      /api/{type}s/{repo_id}/refs
    POST     /api/{type}s/{repo_id}/branch/{branch}  {"startingPoint": rev}
    POST     /api/{type}s/{repo_id}/preupload/{rev}  answers "regular" for every file
    POST     /api/{type}s/{repo_id}/commit/{branch}  NDJSON: header, file, deletedFile, deletedFolder
    HEAD|GET /[{type}s/]{repo_id}/resolve/{rev}/{path}   X-Repo-Commit, ETag, Content-Length

{type} is model, dataset or space; model URLs outside /api/ carry no prefix. Anything else gets a
404 naming the request, which is where to look when a new client call fails here. Every request is
logged in `HubServer.requests`.

Because /preupload answers "regular" for every file, the client sends file contents base64-encoded
inside the commit payload and never starts an LFS or Xet transfer; so no storage backend is needed
and hf_xet may stay installed and enabled. Keep files small (a few MB).

Every commit is an immutable revision named by a 40-hex sha; branches point at commits, "main" at
the latest; a new repo starts with one commit holding `.gitattributes`, as on the Hub. Contents are
kept content-addressed (git blob sha1, which is also the ETag) in a temporary directory.

Authentication is `Authorization: Bearer <token>` against a fixed `{token: user}` table. A user owns
the namespace named after them. Errors carry the headers `huggingface_hub` turns into exceptions:
a missing repo is 404 and a private one asked for anonymously is 401, both with
`X-Error-Code: RepoNotFound` (RepositoryNotFoundError); `RevisionNotFound` -> RevisionNotFoundError;
`EntryNotFound` -> RemoteEntryNotFoundError (an EntryNotFoundError); an unknown token is 401 with
`X-Error-Message: Invalid credentials in Authorization header` (a plain HfHubHTTPError).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKENS = {"hf_test_token": "testuser", "hf_other_token": "otheruser"}
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_SHA = re.compile(r"[0-9a-f]{7,40}")


class HubError(Exception):
    """An HTTP error answered with the `X-Error-Code` / `X-Error-Message` headers the client reads."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.commit: str | None = extra.pop("commit", None)  # sent as X-Repo-Commit
        self.extra = extra  # more fields of the JSON body


@dataclass(frozen=True)
class Commit:
    oid: str
    title: str
    date: str
    files: dict[str, str]  # path in repo -> blob oid


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        """Path of the repo's web pages: `user/name` for models, `datasets/user/name` otherwise."""
        return self.repo_id if self.repo_type == "model" else f"{self.repo_type}s/{self.repo_id}"

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name, full sha or unique sha prefix points at."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _SHA.fullmatch(revision):
            found = [oid for oid in self.commits if oid.startswith(revision)]
            if len(found) == 1:
                return self.commits[found[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubServer:
    """The server: state, lifecycle, and request handling (the handler class only forwards here).

    Binds 127.0.0.1 on an ephemeral port at construction, so `endpoint` is known before `start()`.
    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._storage = tempfile.TemporaryDirectory(prefix="hub-server-")
        self._blobs = Path(self._storage.name)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def token(self) -> str:
        """The first valid token; `user` is its owner."""
        return next(iter(self.tokens))

    @property
    def user(self) -> str:
        return self.tokens[self.token]

    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and delete all stored files. Safe to call twice, or without `start()`."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
        self._storage.cleanup()

    def reset(self) -> None:
        """Forget every repo and logged request (blobs stay: they are content-addressed)."""
        with self._lock:
            self.repos.clear()
            self.requests.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- storage ---------------------------------------------------------------------------

    def _put_blob(self, content: bytes) -> str:
        oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()  # git's blob id
        path = self._blobs / oid
        if not path.exists():
            path.write_bytes(content)
        return oid

    def _blob(self, oid: str) -> bytes:
        return (self._blobs / oid).read_bytes()

    def _size(self, oid: str) -> int:
        return (self._blobs / oid).stat().st_size

    def _commit(self, repo: Repo, branch: str, title: str, files: dict[str, str]) -> Commit:
        seed = json.dumps([repo.repo_id, branch, title, files, next(self._counter)]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), title, _now(), dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    # -- access ----------------------------------------------------------------------------

    def _user(self, authorization: str | None) -> str | None:
        if authorization is None:
            return None
        user = self.tokens.get(authorization.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            # Like the Hub: anonymous callers cannot tell a private repo from a missing one.
            status = 401 if repo is not None and user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self._readable(repo_type, repo_id, user)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- dispatch --------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: Any, body: bytes
    ) -> tuple[int, dict, bytes]:
        """Answer one request: (status, headers, body). HEAD gets GET's headers, without a body."""
        url = urlsplit(raw_path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append((method, url.path))
            try:
                user = self._user(headers.get("Authorization"))
                return self._route(method, parts, query, user, body)
            except HubError as error:
                return _error(error)
            except (KeyError, ValueError) as error:  # a payload this server does not understand
                return _error(HubError(400, f"Bad request to the test hub server: {error!r}"))

    def _route(self, method: str, parts: list[str], query: dict, user: str | None, body: bytes):
        verb = "GET" if method == "HEAD" else method
        if parts[0] == "api":
            if parts[1:] == ["whoami-v2"] and verb == "GET":
                return self._whoami(user)
            if parts[1:] == ["validate-yaml"] and verb == "POST":
                return _json({"errors": [], "warnings": []})
            if parts[1:] == ["repos", "create"] and verb == "POST":
                return self._create_repo(json.loads(body), user)
            if len(parts) >= 4 and parts[1] in REPO_TYPES:
                repo_type, repo_id, rest = REPO_TYPES[parts[1]], "/".join(parts[2:4]), parts[4:]
                return self._repo_api(verb, repo_type, repo_id, rest, query, user, body)
        else:  # file URLs: [{type}s/]{user}/{name}/resolve/{rev}/{path}
            repo_type = REPO_TYPES[parts[0]] if parts[0] in ("datasets", "spaces") else "model"
            parts = parts[1:] if repo_type != "model" else parts
            if len(parts) >= 5 and parts[2] == "resolve" and verb == "GET":
                repo = self._readable(repo_type, "/".join(parts[:2]), user)
                return self._resolve(repo, parts[3], "/".join(parts[4:]), send_body=method == "GET")
        raise HubError(404, f"Not implemented by the test hub server: {method} /{'/'.join(parts)}")

    def _repo_api(self, verb, repo_type, repo_id, rest, query, user, body):
        if verb == "GET" and (not rest or rest[0] == "revision"):
            repo = self._readable(repo_type, repo_id, user)
            return self._info(repo, rest[1] if rest else "main")
        if verb == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            repo = self._readable(repo_type, repo_id, user)
            recursive = query.get("recursive", "").lower() in ("true", "1")
            return self._tree(repo, rest[1], "/".join(rest[2:]), recursive)
        if verb == "GET" and rest == ["refs"]:
            return self._refs(self._readable(repo_type, repo_id, user))
        if verb == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
            repo = self._writable(repo_type, repo_id, user)
            return self._create_branch(repo, rest[1], json.loads(body or b"{}"))
        if verb == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            return self._preupload(
                self._writable(repo_type, repo_id, user), rest[1], json.loads(body)
            )
        if verb == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            if query.get("create_pr"):
                raise HubError(400, "Pull requests are not supported by the test hub server")
            return self._apply_commit(self._writable(repo_type, repo_id, user), rest[1], body)
        raise HubError(404, f"Not implemented by the test hub server: {verb} {repo_id} {rest}")

    # -- endpoints -------------------------------------------------------------------------

    def _whoami(self, user: str | None):
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        auth = {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}
        return _json({"type": "user", "name": user, "fullname": user, "orgs": [], "auth": auth})

    def _create_repo(self, payload: dict, user: str | None):
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(
                403, f"You don't have the rights to create a repo under the namespace {namespace}"
            )
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:  # `create_repo(exist_ok=True)` reads the url from this answer
            url = f"{self.endpoint}/{existing.url_path}"
            raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", url=url)
        private = payload.get("visibility", "public") == "private"
        repo = Repo(repo_type, repo_id, private, _now())
        self._commit(
            repo, "main", "initial commit", {".gitattributes": self._put_blob(GITATTRIBUTES)}
        )
        self.repos[(repo_type, repo_id)] = repo
        return _json({"url": f"{self.endpoint}/{repo.url_path}", "name": repo_id})

    def _info(self, repo: Repo, revision: str):
        commit = repo.resolve(revision)
        files = sorted(commit.files.items())
        siblings = [{"rfilename": p, "size": self._size(o), "blobId": o} for p, o in files]
        info = {
            "id": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "private": repo.private,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "siblings": siblings,
        }
        return _json(info)

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool):
        commit = repo.resolve(revision)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        files, folders = [], set()
        for path, oid in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parents = path[len(prefix) :].split("/")[:-1]
            if recursive:
                folders.update(
                    prefix + "/".join(parents[:depth]) for depth in range(1, len(parents) + 1)
                )
            elif parents:
                folders.add(prefix + parents[0])
            if recursive or not parents:
                files.append({"type": "file", "oid": oid, "size": self._size(oid), "path": path})
        if prefix and not files and not folders:
            raise HubError(
                404, f"No folder {folder} at {revision}", "EntryNotFound", commit=commit.oid
            )
        dirs = [
            {"type": "directory", "oid": _tree_oid(commit, d), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        return _json(dirs + files)

    def _refs(self, repo: Repo):
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
            for b, o in repo.branches.items()
        ]
        return _json({"branches": branches, "converts": [], "tags": []})

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = repo.resolve(payload.get("startingPoint") or "main").oid
        return _json({})

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        commit = repo.resolve(revision)
        regular = {"uploadMode": "regular", "shouldIgnore": False}
        answers = [
            {"path": f["path"], "oid": commit.files.get(f["path"]), **regular}
            for f in payload["files"]
        ]
        return _json({"files": answers, "commitOid": commit.oid})

    def _apply_commit(self, repo: Repo, branch: str, body: bytes):
        if branch not in repo.branches:  # commits go to branches, never to a sha
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent):
            raise HubError(412, f"Branch {branch} has moved: its head is {head.oid}, not {parent}")
        files = dict(head.files)
        for line in lines:
            key, path = line["key"], line["value"].get("path", "")
            if key == "file":
                files[path] = self._put_blob(base64.b64decode(line["value"]["content"]))
            elif key in ("deletedFile", "deletedFolder"):
                doomed = [path] if key == "deletedFile" and path in files else []
                if key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not doomed:  # the client looks for this message
                    missing = "A file with this name doesn't exist"
                    raise HubError(404, f"{missing}: {path}", "EntryNotFound", commit=head.oid)
                for p in doomed:
                    del files[p]
            elif key != "header":  # "lfsFile" included: /preupload never asks for LFS
                raise HubError(400, f"Commit operation {key!r} is not supported by the test hub")
        commit = self._commit(repo, branch, header.get("summary", ""), files)
        url = f"{self.endpoint}/{repo.url_path}/commit/{commit.oid}"
        done = {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}
        return _json(done)

    def _resolve(self, repo: Repo, revision: str, path: str, send_body: bool):
        commit = repo.resolve(revision)
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, f"No file {path} at {revision}", "EntryNotFound", commit=commit.oid)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{oid}"',
            "Content-Type": "application/octet-stream",
            "Content-Length": str(self._size(oid)),
        }
        return 200, headers, self._blob(oid) if send_body else b""


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, lets `HubServer.handle` answer it, writes the answer. HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle connection may hold its thread

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        status, headers, payload = hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet: requests are in hub.requests
        pass


def _json(data: Any, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _error(error: HubError) -> tuple[int, dict, bytes]:
    status, headers, body = _json({"error": error.message, **error.extra}, error.status)
    headers["X-Error-Message"] = error.message
    if error.code is not None:
        headers["X-Error-Code"] = error.code
    if error.commit is not None:
        headers["X-Repo-Commit"] = error.commit
    return status, headers, body


def _tree_oid(commit: Commit, folder: str) -> str:
    return hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["DEFAULT_TOKENS", "HubError", "HubServer"]
