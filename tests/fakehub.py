"""A fake Hugging Face Hub for the real huggingface_hub client, with fault injection.

Serves the routes huggingface_hub uses to resolve, list and download (DESIGN.md section 11):
  GET       /api/models/{repo}/revision/{rev}
  GET       /api/models/{repo}/tree/{rev}?recursive=...   (paginated with a Link header)
  HEAD/GET  /{repo}/resolve/{rev}/{path}                   (X-Repo-Commit, ETag, Range)
  HEAD/GET  /cdn/{sha256}?X-Amz-Signature=...             (with `cdn` set: where an LFS file's
            /resolve/ redirects, as the real Hub's does, to a signed URL on another host)
Faults are queued per route and consumed by matching requests: an HTTP status (429 with
Retry-After, 500, 503), a connection dropped mid-file, wrong bytes of the right size, or the file's
bytes and then more, with no length (a mirror that never stops sending).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.httpd import QuietHandler, QuietServer

HOLD_LIMIT = 5.0  # seconds a held file GET waits for its condition, then is answered (huggingface_hub waits 10)


ENDLESS_MIB = 256  # what an "endless" answer sends past the file, at most (a test must end)
TRICKLE_GAP = 0.25  # seconds between the bytes of a "trickle" answer


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    route: str  # "revision" | "tree" | "file" | "cdn"
    # "status" | "drop" | "corrupt" | "endless" (the file, then more, chunked: no length) | "rewind" (a
    # resumed GET answered 206 with the file from its start, all but its last byte, then dropped) |
    # "trickle" (the file a byte every TRICKLE_GAP seconds: never a read timeout)
    kind: str
    times: int = 1
    status: int = 429
    headers: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # for "file": only this repo path
    methods: tuple[str, ...] = ("GET", "HEAD")
    acted: int = 0  # requests it changed the answer of (a "rewind" is taken by a GET without Range too)


def _file_head(h: BaseHTTPRequestHandler, status: int, length: int, headers: dict[str, str]) -> None:
    """The status line and headers of a file's answer, its body to come."""
    h.send_response(status)
    h.send_header("Content-Type", "application/octet-stream")
    h.send_header("Content-Length", str(length))
    for k, v in headers.items():
        h.send_header(k, v)
    h.end_headers()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    lfs: set[str]


class FakeHub:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.repos: dict[str, dict[str, Commit]] = {}  # repo -> ref or sha -> commit
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.page_size = 1000
        self.next_page_base: str | None = None  # where a listing's Link names its next page (None: here)
        self.tokens: dict[str, str] = {}  # private repo -> the bearer token it needs
        self.file_delay = 0.0  # seconds each file GET stays in flight at least (more at once than allowed shows)
        # repo path -> a condition its GETs wait for (HOLD_LIMIT seconds at most), and whether it was met
        # for all of them (False: one was answered at the time limit instead)
        self.hold_until: dict[str, Callable[[], bool]] = {}
        self.held: dict[str, bool] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.auth_headers: list[str] = []
        # Redirect LFS files to /cdn/ on another host name (localhost for 127.0.0.1), signed with this
        # (a bearer credential, as the real Hub's CDN URLs are for an hour).
        self.cdn_signature: str | None = None
        self.cdn_host = "localhost"  # this server by another name
        self._lock = threading.Lock()
        hub = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

        self.server = QuietServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.faults.clear()
            self.requests.clear()
            self.page_size = 1000
            self.next_page_base = None
            self.tokens.clear()
            self.file_delay = 0.0
            self.hold_until.clear()
            self.held.clear()
            self.inflight = self.max_inflight = 0
            self.auth_headers.clear()
            self.cdn_signature = None
            self.cdn_host = "localhost"

    # --- content ------------------------------------------------------------------------------

    def add_repo(self, repo: str, files: dict[str, bytes], *, ref: str = "main", lfs_min_size: int = 1024) -> str:
        """Publish `files` as a new commit on `ref`; files of `lfs_min_size` bytes or more are LFS."""
        h = hashlib.sha1(repo.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = h.hexdigest()
        commit = Commit(sha, dict(files), {p for p, d in files.items() if len(d) >= lfs_min_size})
        refs = self.repos.setdefault(repo, {})
        refs[ref] = commit
        refs[sha] = commit
        return sha

    def inject(self, route: str, kind: str = "status", **kwargs: object) -> Fault:
        fault = Fault(route, kind, **kwargs)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(fault)
        return fault

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and unquote(p.split("?")[0]).endswith(suffix))

    # --- serving ------------------------------------------------------------------------------

    def _take_fault(self, route: str, method: str, path: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.route == route and method in fault.methods and fault.times > 0:
                    if fault.path is not None and fault.path != path:
                        continue
                    fault.times -= 1
                    return fault
        return None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self._lock:
            self.requests.append((method, h.path))
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        try:
            if path.startswith("/api/models/") and "/revision/" in path:
                repo, rev = path[len("/api/models/") :].split("/revision/", 1)
                self._revision(h, method, repo, rev)
            elif path.startswith("/api/models/") and "/tree/" in path:
                repo, rest = path[len("/api/models/") :].split("/tree/", 1)
                self._tree(h, method, repo, rest, query)
            elif "/resolve/" in path:
                repo, rest = path.lstrip("/").split("/resolve/", 1)
                self._resolve(h, method, repo, rest)
            elif path.startswith("/cdn/"):
                self._cdn(h, method, path[len("/cdn/") :], query)
            else:
                self._send(h, 404, b'{"error":"not found"}', method=method)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        *,
        method: str,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)

    def _fault_response(self, h: BaseHTTPRequestHandler, fault: Fault, method: str) -> None:
        self._send(h, fault.status, b'{"error":"injected"}', method=method, headers=fault.headers)

    def _commit(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str) -> Commit | None:
        refs = self.repos.get(repo)
        auth = h.headers.get("Authorization")
        if auth:
            with self._lock:
                self.auth_headers.append(auth)
        if repo in self.tokens and auth != f"Bearer {self.tokens[repo]}":
            self._send(
                h, 401, b'{"error":"Invalid credentials"}', method=method, headers={"X-Error-Code": "RepoNotFound"}
            )
            return None
        if refs is None:
            self._send(
                h, 404, b'{"error":"Repository not found"}', method=method, headers={"X-Error-Code": "RepoNotFound"}
            )
            return None
        commit = refs.get(rev)
        if commit is None:
            self._send(
                h, 404, b'{"error":"Invalid rev id"}', method=method, headers={"X-Error-Code": "RevisionNotFound"}
            )
        return commit

    def _revision(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str) -> None:
        fault = self._take_fault("revision", method, None)
        if fault:
            return self._fault_response(h, fault, method)
        commit = self._commit(h, method, repo, rev)
        if commit is None:
            return None
        body = {"id": repo, "sha": commit.sha, "siblings": [{"rfilename": p} for p in sorted(commit.files)]}
        return self._send(h, 200, json.dumps(body).encode(), method=method)

    def _tree(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str, query: dict[str, list[str]]) -> None:
        fault = self._take_fault("tree", method, None)
        if fault:
            return self._fault_response(h, fault, method)
        commit = self._commit(h, method, repo, rev)
        if commit is None:
            return None
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: list[dict[str, object]] = []
        dirs: set[str] = set()
        for p in sorted(commit.files):
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            if not recursive and len(parts) > 1:
                continue
            data = commit.files[p]
            entry: dict[str, object] = {"type": "file", "path": p, "size": len(data), "oid": git_oid(data)}
            if p in commit.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        for d in sorted(dirs):
            if recursive or "/" not in d:
                entries.append({"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()})
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + self.page_size]
        headers = {}
        if start + self.page_size < len(entries):
            base = self.next_page_base or self.url
            nxt = f"{base}/api/models/{repo}/tree/{quote(rev, safe='')}?recursive={str(recursive).lower()}"
            headers["Link"] = f'<{nxt}&cursor={start + self.page_size}>; rel="next"'
        return self._send(h, 200, json.dumps(page).encode(), method=method, headers=headers)

    def _resolve(self, h: BaseHTTPRequestHandler, method: str, repo: str, rest: str) -> None:
        commit_sha_or_ref, _, file_path = rest.partition("/")
        fault = self._take_fault("file", method, file_path)
        if fault and fault.kind == "status":
            return self._fault_response(h, fault, method)
        commit = self._commit(h, method, repo, commit_sha_or_ref)
        if commit is None:
            return None
        data = commit.files.get(file_path)
        if data is None:
            return self._send(
                h, 404, b'{"error":"Entry not found"}', method=method, headers={"X-Error-Code": "EntryNotFound"}
            )
        etag = hashlib.sha256(data).hexdigest() if file_path in commit.lfs else git_oid(data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if file_path in commit.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
            if self.cdn_signature is not None:
                port = self.server.server_address[1]
                cdn = (
                    f"http://{self.cdn_host}:{port}/cdn/{etag}?X-Amz-Expires=3600&X-Amz-Signature={self.cdn_signature}"
                )
                return self._send(h, 302, b"", method=method, headers=headers | {"Location": cdn})
        return self._serve(h, method, file_path, data, headers, fault)

    def _cdn(self, h: BaseHTTPRequestHandler, method: str, sha256: str, query: dict[str, list[str]]) -> None:
        """The signed URL a redirect named: the file by its sha256, for the signature only."""
        fault = self._take_fault("cdn", method, None)
        if fault and fault.kind == "status":
            return self._fault_response(h, fault, method)
        found = [
            (p, d)
            for refs in self.repos.values()
            for commit in refs.values()
            for p, d in commit.files.items()
            if p in commit.lfs and hashlib.sha256(d).hexdigest() == sha256
        ]
        if query.get("X-Amz-Signature") != [self.cdn_signature] or not found:
            return self._send(h, 403, b"<Error><Code>AccessDenied</Code></Error>", method=method)
        file_path, data = found[0]
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        return self._serve(h, method, file_path, data, headers, fault)

    def _serve(
        self,
        h: BaseHTTPRequestHandler,
        method: str,
        file_path: str,
        data: bytes,
        headers: dict[str, str],
        fault: Fault | None,
    ) -> None:
        start = 0
        status = 200
        range_header = h.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and method == "GET":
            start = int(range_header[len("bytes=") :].split("-")[0] or 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if method == "GET":
            with self._lock:
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                time.sleep(self.file_delay)
                if (until := self.hold_until.get(file_path)) is not None:
                    deadline = time.monotonic() + HOLD_LIMIT
                    while not (met := until()) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    with self._lock:  # met for every GET of that path
                        self.held[file_path] = self.held.get(file_path, True) and met
            finally:
                with self._lock:
                    self.inflight -= 1
        if fault and fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body)
        if fault and fault.kind == "rewind" and status == 206:
            fault.acted += 1
            h.send_response(206)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(data)))  # more than the range asked: the client cuts it
            h.send_header("Content-Range", headers["Content-Range"])
            h.end_headers()
            with contextlib.suppress(OSError):
                h.wfile.write(data[:-1])
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return None
        if fault and fault.kind == "trickle" and method == "GET":
            fault.acted += 1
            _file_head(h, status, len(body), headers)
            with contextlib.suppress(OSError):  # the client hangs up: what it is meant to do
                for i in range(len(body)):
                    h.wfile.write(body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(TRICKLE_GAP)
            h.close_connection = True
            return None
        if fault and fault.kind == "endless" and method == "GET":
            h.send_response(status)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up: what it is meant to do
                for piece in (body, *[bytes(1 << 20)] * ENDLESS_MIB):
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                h.wfile.write(b"0\r\n\r\n")
            h.close_connection = True
            return None
        if fault and fault.kind == "drop":
            _file_head(h, status, len(body), headers)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return None
        self._send(h, status, body, method=method, headers=headers, content_type="application/octet-stream")
        return None
