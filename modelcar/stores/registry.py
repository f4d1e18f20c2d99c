"""A registry (OCI distribution API) as a store: our own thin client on httpx (registry_client).

Why not oras-py (DESIGN.md section 8): it holds whole blobs in memory, re-serialises manifests,
cannot mount across repositories, ignores Retry-After and shares one bearer token across
scopes. Here blobs stream in 1 MiB chunks, manifests go up as the exact bytes we hashed,
tokens are cached per scope, and every call retries the way the registry asks.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import suppress
from functools import partial

import httpx

from modelcar.errors import BlobNotFound, DigestMismatch, InputError, IntegrityError, ModelcarError
from modelcar.fsutil import Chunk
from modelcar.image import DIGEST_RE, MEDIA_INDEX, MEDIA_MANIFEST, Descriptor, digest_of
from modelcar.retry import Flights, call_with_retry, is_connection_error, worker_pool
from modelcar.stall import paced, read_capped
from modelcar.stores import LOOKUPS, MANIFEST_MAX, BlobSource, Store, StoredImage, registry_prefix_problem
from modelcar.stores.registry_client import (
    AuthError,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    error_body,
    origin,
    registry_message,
)

log = logging.getLogger("modelcar")

MANIFEST_ACCEPT = ", ".join(
    [
        MEDIA_INDEX,
        MEDIA_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


MANIFEST_ATTEMPTS = 4  # a manifest PUT answered "blob unknown" for blobs just stored: see put_manifest
# A blob this small (an image config, a layer of small JSON files) costs less to send again than a
# round trip to ask whether the registry has it: put_blob does not ask.
SMALL_BLOB = 256 * 1024


PATCH_OK = (202, 201)  # 202 Accepted is the spec's; ECR answers 201 Created to a chunk (DESIGN.md section 8)
# A PATCH body refused as such: no PATCH at all (405, as Artifact Registry says of chunks), a body
# over a cap (413 from a proxy, 416 REQUESTED_RANGE_NOT_SATISFIABLE from GHCR over 4 MiB); and a 400
# whose error document says UNSUPPORTED, the distribution spec's code for an operation not done
PATCH_REFUSED = (405, 413, 416)


class _StreamRefused(Exception):
    """A streamed upload's PATCH refused as such (PATCH_REFUSED): the blob is hashed first, then PUT."""


def _scopes(repo: str, write: bool, mount_from: str | None = None) -> tuple[str, ...]:
    scopes = [f"repository:{repo}:{'pull,push' if write else 'pull'}"]
    if mount_from is not None:
        scopes.append(f"repository:{mount_from}:pull")
    return tuple(scopes)


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + digest


def _what_ref(ref: str) -> str:
    """`tag stable` or `manifest sha256:...`: what a user asked for, in their words."""
    return f"manifest {ref}" if ref.startswith("sha256:") else f"tag {ref}"


class RegistryStore(Store):
    """Images under a repository prefix of one registry: `HOST[:PORT]/PATH`."""

    retries_puts = True

    def close(self, commit: bool = True) -> None:
        self.client.http.close()

    def __init__(
        self, prefix: str, options: RegistryOptions | None = None, *, write: bool = False, namespace: str | None = None
    ) -> None:
        """`namespace`: the repository path whose credentials to use (podman's auth files may hold
        one entry per namespace), where it is not the prefix's (an image named by HOST/REPO)."""
        if (problem := registry_prefix_problem(prefix.rstrip("/"))) is not None:
            raise InputError(problem)
        host, _, path = prefix.partition("/")
        if "." not in host and ":" not in host and host != "localhost":
            raise InputError(f"{prefix!r} is not a registry prefix: use HOST[:PORT]/PATH, with a dot or a port in HOST")
        self.host = host
        self.path = path.strip("/")
        self.prefix = prefix.rstrip("/")
        self.client = RegistryClient(
            host, options or RegistryOptions.create(), self.path if namespace is None else namespace
        )
        self.write = write
        self.max_blob_size = self.client.options.max_layer_size or None
        self._seen: dict[str, set[str]] = {}  # digest -> repositories known to hold it
        self._missing: set[tuple[str, str]] = set()  # (repo, digest) a HEAD in this run found absent
        self._refused: set[str] = set()  # repositories a mount from was refused (not readable here)
        self._manifests: Flights[tuple[str, str], bytes] = Flights()  # by (repo, digest)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return self.prefix

    def reference(self, repo: str, digest: str) -> str:
        return f"{self.host}/{repo}@{digest}"  # `repo` is the whole repository path

    def image_name(self, model: str) -> str:
        return f"{self.path}/{model}" if self.path else model

    def repository(self, model: str) -> str:
        """The full reference of a model's repository, as recorded in the lock."""
        return f"{self.host}/{self.image_name(model)}"

    def _note(self, digest: str, repo: str) -> None:
        with self._lock:
            self._seen.setdefault(digest, set()).add(repo)
            self._missing.discard((repo, digest))

    def known_in(self, blobs: Iterable[Descriptor], other: Store, repo: str) -> None:
        if isinstance(other, RegistryStore) and other.host == self.host:
            for blob in blobs:
                self._note(blob.digest, repo)

    def repo_of(self, repository: str) -> str | None:
        host, _, repo = repository.partition("/")
        return repo if host == self.host and repo else None

    def mount_blob(self, repo: str, digest: str) -> bool:
        if (mount_from := self._mount_source(repo, digest)) is None:
            return False
        try:
            r, scopes = self._post_upload(repo, digest, mount_from, retry=True)
        except AuthError as exc:
            self._unreadable(mount_from, repo, exc)
            return False
        if r is None:
            self._note(digest, repo)
            return True
        # not mounted (the registry opened an upload session instead): closed, the blob is sent later
        self._end_session(repo, self.client.location(r), scopes)
        return False

    def _end_session(self, repo: str, location: str, scopes: tuple[str, ...]) -> None:
        """Close an upload session this run gives up (a mount answered with one, an upload that
        failed and starts again from a new one): best effort, a registry expires idle ones anyway."""
        with suppress(Exception):
            self.client.request("DELETE", location, scopes=scopes, what=f"{repo}: end upload", retry=False)

    def _start_upload(
        self, repo: str, digest: str | None, *, retry: bool
    ) -> tuple[httpx.Response | None, tuple[str, ...]]:
        """POST an upload session, asking the registry to mount `digest` from another repository
        of it known to hold the blob: (None when it did, else the session's answer; the scopes)."""
        if (mount_from := self._mount_source(repo, digest)) is not None:
            try:
                return self._post_upload(repo, digest, mount_from, retry=retry)
            except AuthError as exc:
                self._unreadable(mount_from, repo, exc)
        return self._post_upload(repo, digest, None, retry=retry)

    def _unreadable(self, mount_from: str, repo: str, exc: AuthError) -> None:
        """A mount is a shortcut: from a repository this user may not read (a CI robot that may
        push to team-b only, mirroring what team-a pushed), the blob goes up as any other, and that
        repository is not asked again in this run."""
        log.debug("%s: not mounting from %s: %s", repo, mount_from, exc)
        with self._lock:
            self._refused.add(mount_from)

    def _post_upload(
        self, repo: str, digest: str | None, mount_from: str | None, *, retry: bool
    ) -> tuple[httpx.Response | None, tuple[str, ...]]:
        scopes = _scopes(repo, True, mount_from)
        start = f"/v2/{repo}/blobs/uploads/"
        if mount_from is not None:
            start += f"?mount={digest}&from={mount_from}"
        what = f"{repo}: start upload"
        r = self.client.request("POST", start, scopes=scopes, what=what, retry=retry)
        if r.status_code == 201 and mount_from is not None:
            log.debug("%s: mounted %s from %s", repo, digest, mount_from)
            return None, scopes
        self.client.check(r, (202,), what, scopes)
        return r, scopes

    def _exists(self, repo: str, kind: str, ref: str, headers: dict[str, str] | None = None) -> bool:
        """HEAD /v2/<repo>/<kind>/<ref>: 200 is there, 404 is not, anything else an error."""
        return self._head(repo, kind, ref, headers) is not None

    def _head(
        self, repo: str, kind: str, ref: str, headers: dict[str, str] | None = None, absent: tuple[int, ...] = (404,)
    ) -> httpx.Response | None:
        """HEAD /v2/<repo>/<kind>/<ref>: the answer where it is there, None for an `absent` status,
        anything else an error."""
        scopes = _scopes(repo, self.write)
        what = f"{repo}: HEAD {kind} {ref}"
        # A blob the registry serves from elsewhere (a CDN, a signed storage URL) is answered with a
        # redirect there: it has the blob. Followed, the signed URL (made for a GET) may refuse a HEAD.
        path = f"/v2/{repo}/{kind}/{ref}"
        r = self.client.request("HEAD", path, scopes=scopes, what=what, headers=headers, redirects=kind != "blobs")
        if r.is_redirect:
            if origin(self.client.location(r)) != origin(str(r.request.url)):
                return r
            r = self.client.request("HEAD", path, scopes=scopes, what=what, headers=headers, redirects=True)
        if r.status_code in absent:
            return None
        self.client.check(r, (200,), what, scopes)
        return r

    def _learned(self, repo: str, digest: str) -> bool | None:
        """What this run learned of the blob in `repo`: held (stored, found, or named by a manifest
        of this repository), absent (a HEAD found it missing), or nothing (None)."""
        with self._lock:
            if repo in self._seen.get(digest, ()):
                return True
            return False if (repo, digest) in self._missing else None

    def has_blob(self, repo: str, digest: str, size: int | None = None) -> bool:
        # a registry checks a blob's digest and size when it takes it: `size` needs no asking
        if self._learned(repo, digest):
            return True
        if not self._exists(repo, "blobs", digest):
            with self._lock:
                self._missing.add((repo, digest))
            return False
        self._note(digest, repo)
        return True

    def put_blob(self, repo: str, size: int, source: BlobSource, digest: str | None = None) -> str:
        if digest is not None:
            learned = self._learned(repo, digest)
            # not asked again (the caller's has_blob just did), nor when it is cheaper to send
            if learned or (learned is None and size > SMALL_BLOB and self.has_blob(repo, digest)):
                return digest
        what = f"{repo}: upload {digest or 'layer'} ({size} bytes)"
        # A failed upload restarts from a new session with the stream rewound: a session that
        # saw part of a body is in an unknown state on most registries.
        result: str = self.client.guard(
            lambda: call_with_retry(lambda: self._upload(repo, size, source, digest), what, self.client.options.retry),
            what,
        )
        self._note(result, repo)
        return result

    def _mount_source(self, repo: str, digest: str | None) -> str | None:
        if digest is None:
            return None
        with self._lock:
            others = sorted(self._seen.get(digest, set()) - {repo} - self._refused)
        return others[0] if others else None

    def _upload(self, repo: str, size: int, source: BlobSource, digest: str | None) -> str:
        c = self.client
        if digest is None and c.no_streaming and c.options.chunk_size == 0:
            digest = _digest_of_source(source, size)  # one more read of the source, for one PUT
            if size > SMALL_BLOB and self.has_blob(repo, digest):
                return digest
        r, scopes = self._start_upload(repo, digest, retry=False)
        if r is None:
            return str(digest)
        location = c.location(r)
        try:
            return self._send(repo, size, source, digest, location, scopes)
        except _StreamRefused:  # this registry wants the digest up front: hash first, then one PUT
            self._end_session(repo, location, scopes)
            return self._upload(repo, size, source, None)
        except Exception as exc:  # the session is not used again: a retry starts a new one
            if not is_connection_error(exc):  # a registry that does not answer is not asked again here
                self._end_session(repo, location, scopes)
            raise

    def _send(
        self, repo: str, size: int, source: BlobSource, digest: str | None, location: str, scopes: tuple[str, ...]
    ) -> str:
        """The blob's bytes into the upload session at `location`, then its digest: the blob's."""
        c = self.client
        octet = {"Content-Type": "application/octet-stream"}

        if digest is not None and c.options.chunk_size == 0:
            r = c.request(
                "PUT",
                _with_digest(location, digest),
                scopes=scopes,
                what=f"{repo}: upload {digest}",
                retry=False,
                headers={**octet, "Content-Length": str(size)},
                body=lambda: _checked(_owned(source()), size, digest),
            )
            c.check(
                r,
                (201,),
                f"{repo}: upload {digest}",
                scopes,
                too_large=f"this registry takes no single upload of {size} bytes: send chunks (--upload-chunk-size)",
            )
            return _confirm(r, digest, c.host)

        hasher = hashlib.sha256()
        sent = 0
        if c.options.chunk_size == 0:

            def whole() -> Iterator[bytes]:
                # Called again when the request is re-sent (a 401 on an expired token): hash afresh.
                nonlocal hasher
                hasher = hashlib.sha256()
                for chunk in _owned(source()):
                    hasher.update(chunk)
                    yield chunk

            r = c.request(
                "PATCH",
                location,
                scopes=scopes,
                what=f"{repo}: upload",
                retry=False,
                headers={**octet, "Content-Length": str(size)},
                body=whole,
            )
            if digest is None and (
                r.status_code in PATCH_REFUSED or (r.status_code == 400 and "UNSUPPORTED" in registry_message(r))
            ):
                # Its digest is not known before the blob is read, so a streamed upload was the one
                # read; this registry wants the digest up front: hash first, then one PUT, here on.
                c.no_streaming = True
                log.info(
                    "%s: a streamed upload was refused (HTTP %d: %s): each new layer is hashed first, then "
                    "sent in one PUT",
                    c.host,
                    r.status_code,
                    registry_message(r),
                )
                raise _StreamRefused
            c.check(r, PATCH_OK, f"{repo}: upload", scopes)
            location = c.location(r, location)
            sent = size
        else:
            for pieces in _rechunk(_owned(source()), c.options.chunk_size):
                length = sum(len(p) for p in pieces)
                for piece in pieces:
                    hasher.update(piece)
                end = sent + length - 1
                r = c.request(
                    "PATCH",
                    location,
                    scopes=scopes,
                    what=f"{repo}: upload chunk",
                    retry=False,
                    headers={**octet, "Content-Length": str(length), "Content-Range": f"{sent}-{end}"},
                    body=partial(iter, pieces),
                )
                c.check(
                    r,
                    PATCH_OK,
                    f"{repo}: upload chunk {sent}-{end}",
                    scopes,
                    too_large="this registry takes smaller chunks: lower --upload-chunk-size (GHCR takes 4 MiB)",
                )
                location = c.location(r, location)
                sent += length
        if sent != size:
            raise IntegrityError(f"{repo}: blob source gave {sent} bytes, expected {size}")
        actual = "sha256:" + hasher.hexdigest()
        if digest is not None and actual != digest:
            raise DigestMismatch(f"{repo}: blob digest mismatch: expected {digest}, got {actual}")
        r = c.request(
            "PUT",
            _with_digest(location, actual),
            scopes=scopes,
            what=f"{repo}: finish upload",
            retry=False,
            headers={**octet, "Content-Length": "0"},
        )
        c.check(r, (201,), f"{repo}: finish upload {actual}", scopes)
        return _confirm(r, actual, c.host)

    def open_blob(self, repo: str, digest: str) -> Iterator[bytes]:
        what = f"{repo}: GET {digest}"
        return _iter_response(self._get_blob(repo, digest, what), self.client, what)

    def blob_head(self, repo: str, digest: str, size: int) -> bytes:
        """A Range request: the rest of the blob is not sent, and the connection stays open for the
        next (inspect asks this of every weight layer). A registry that ignores Range sends it
        all, which is cut off after `size` bytes."""
        if size <= 0:  # no range to ask for (`bytes=0--1`)
            return b""
        what = f"{repo}: GET {digest} (its first {size} bytes)"
        response = self._get_blob(repo, digest, what, f"bytes=0-{size - 1}")
        return _take(_iter_response(response, self.client, what), size)

    def _get_blob(self, repo: str, digest: str, what: str, byte_range: str | None = None) -> httpx.Response:
        scopes = _scopes(repo, self.write)
        headers = {"Range": byte_range} if byte_range else None
        r = self.client.request(
            "GET", f"/v2/{repo}/blobs/{digest}", scopes=scopes, what=what, headers=headers, stream=True
        )
        try:
            if r.status_code == 404:  # the registry's words (BLOB_UNKNOWN) say which of its lists lacks it
                raise BlobNotFound(f"{self.host}/{repo}: blob {digest} not found ({registry_message(r)})")
            self.client.check(r, (200, 206) if byte_range else (200,), what, scopes)
        except BaseException:
            r.close()
            raise
        return r

    def has_manifest(self, repo: str, ref: str) -> bool:
        """Whether the registry holds this manifest or index (HEAD, by tag or digest)."""
        return self._exists(repo, "manifests", ref, {"Accept": MANIFEST_ACCEPT})

    def holds(self, repo: str, digest: str, image: Callable[[], StoredImage]) -> bool:
        """Every platform's manifest and every blob of `image`, asked by HEADs, all at once: a
        registry's clean-up (GHCR's untagged versions, a garbage collection) may have deleted a
        platform's manifest or a layer under a tag that still names the index."""
        try:
            wanted = image()  # read from here itself (`plan`), a platform's manifest gone fails it
            asks: list[Callable[[], bool]] = [
                partial(self.has_manifest, repo, desc.digest) for desc, _ in wanted.manifests if wanted.is_index
            ]
            asks += [partial(self.has_blob, repo, blob.digest) for blob in wanted.blobs()]
            with worker_pool(min(len(asks), LOOKUPS)) as pool:
                return all(pool.map(lambda ask: ask(), asks))
        except ModelcarError:  # not for this user to ask (a push-only token): copied, and so said
            return False

    def named_digest(self, repo: str, ref: str) -> str | None:
        """A HEAD's Docker-Content-Digest (a GET where a registry does not send it). None too where
        this user may not read manifests (a push-only token: ECR's minimal push policy)."""
        r = self._head(repo, "manifests", ref, {"Accept": MANIFEST_ACCEPT}, absent=(401, 403, 404))
        if r is None:
            return None
        said = r.headers.get("Docker-Content-Digest", "")
        return said if DIGEST_RE.fullmatch(said) else digest_of(self.get_manifest(repo, ref))

    def put_manifest(self, repo: str, data: bytes, media_type: str, ref: str | None = None) -> str:
        digest = digest_of(data)
        scopes = _scopes(repo, True)
        what = f"{repo}: PUT manifest {ref or digest}"
        for attempt in range(1, MANIFEST_ATTEMPTS + 1):
            r = self.client.request(
                "PUT",
                f"/v2/{repo}/manifests/{ref or digest}",
                scopes=scopes,
                what=what,
                headers={"Content-Type": media_type},
                body=lambda: data,
            )
            if attempt == MANIFEST_ATTEMPTS or not _blob_not_settled(r):
                break
            # Every blob the manifest names was stored or found before this PUT. A registry that
            # says otherwise is catching up: replicas, or a second writer of the same blob whose
            # commit rewrites the repository's link to it (docker-registry's filesystem driver
            # truncates, then writes: read in between, the link is empty). A blob truly missing
            # still fails, after the last attempt.
            log.debug("%s: %s; asking again", what, registry_message(r))
            time.sleep(0.25 * attempt)
        message = registry_message(r)
        if r.status_code == 415 or (
            r.status_code == 400 and ("MANIFEST_INVALID" in message or "UNSUPPORTED" in message)
        ):
            raise RegistryError(
                f"{self.host}: {what}: HTTP {r.status_code}: {message}: the registry refused the {media_type} "
                "modelcar wrote; if it does not take that OCI type, use another registry or a newer version of it"
            )
        self.client.check(r, (201,), what, scopes)
        return _confirm(r, digest, self.host)

    def get_manifest(self, repo: str, ref: str) -> bytes:
        """By tag: asked every time. By digest: asked once per run, however many readers want it at
        once (a rebuild reads the image its lock pins and the one its commit tag names, the same
        image: its manifests are fetched once, not twice). What a digest names cannot change."""
        if not ref.startswith("sha256:"):
            return self._get_manifest(repo, ref)
        return self._manifests.once((repo, ref), lambda: self._get_manifest(repo, ref))

    def _get_manifest(self, repo: str, ref: str) -> bytes:
        scopes = _scopes(repo, self.write)
        what = f"{repo}: GET manifest {ref}"
        r = self.client.request(
            "GET",
            f"/v2/{repo}/manifests/{ref}",
            scopes=scopes,
            what=what,
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        try:
            if r.status_code == 404:
                error_body(r)  # read, so that the connection is not reset
                raise RegistryError(f"{self.host}/{repo}: {_what_ref(ref)} not found")
            self.client.check(r, (200,), what, scopes)
            # read up to a cap, as containerd does: a server that sends without end is cut off
            try:
                body = read_capped(r, MANIFEST_MAX, self.client.stall_window)
            except (httpx.HTTPError, TimeoutError) as exc:  # the cause says it is worth retrying (a dropped connection)
                raise RegistryError(f"{self.host}: {what}: {type(exc).__name__}: {exc}") from exc
        finally:
            r.close()
        if body is None:
            raise RegistryError(f"{self.host}: {what}: larger than {MANIFEST_MAX} bytes: not a manifest")
        if ref.startswith("sha256:") and digest_of(body) != ref:
            raise IntegrityError(f"{self.host}/{repo}: manifest {ref} has digest {digest_of(body)}")
        return body


def _blob_not_settled(response: httpx.Response) -> bool:
    return response.status_code == 400 and "MANIFEST_BLOB_UNKNOWN" in registry_message(response)


def _confirm(response: httpx.Response, digest: str, host: str) -> str:
    """The registry must store the digest we computed: anything else is a re-serialised copy."""
    stored = response.headers.get("Docker-Content-Digest")
    if stored and stored != digest:
        raise IntegrityError(f"{host}: stored digest {stored} differs from ours {digest}")
    return digest


def _owned(chunks: Iterable[Chunk]) -> Iterator[bytes]:
    """The chunks as bytes the HTTP client may keep: a view of a reused buffer is copied, which
    costs nothing extra (h11 copies any non-bytes piece it sends), while a `bytes` chunk goes
    through as it is."""
    for chunk in chunks:
        yield chunk if isinstance(chunk, bytes) else chunk.tobytes()


def _digest_of_source(source: BlobSource, size: int) -> str:
    h = hashlib.sha256()
    n = 0
    for chunk in source():
        h.update(chunk)
        n += len(chunk)
    if n != size:
        raise IntegrityError(f"blob source gave {n} bytes, expected {size}")
    return "sha256:" + h.hexdigest()


def _checked(chunks: Iterable[bytes], size: int, digest: str) -> Iterator[bytes]:
    """Stream while hashing; a source that changed under us fails before the registry commits."""
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
        yield chunk
    if n != size or "sha256:" + h.hexdigest() != digest:
        raise DigestMismatch(f"blob source does not match {digest} ({n} of {size} bytes)")


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """Re-cut a stream into PATCH bodies of exactly `size` bytes (the last may be shorter), each
    kept as the stream's own pieces: no body-sized copies, which fragment the heap (4 MiB chunks
    cost ~120 MiB of RSS that way), and a body can be sent again after a 401."""
    body: list[bytes] = []
    filled = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            take = view[: size - filled]
            body.append(take.tobytes() if len(take) < len(chunk) else chunk)
            filled += len(take)
            view = view[len(take) :]
            if filled == size:
                yield body
                body, filled = [], 0
    if body:
        yield body


def _take(chunks: Generator[bytes, None, None], size: int) -> bytes:
    """The first `size` bytes of a stream, which is closed then (a registry's answer is dropped
    unread past them)."""
    head = bytearray()
    try:
        for chunk in chunks:
            head += chunk
            if len(head) >= size:
                break
    finally:
        chunks.close()
    return bytes(head[:size])


def _iter_response(response: httpx.Response, client: RegistryClient, what: str) -> Generator[bytes, None, None]:
    try:
        # The pieces as the socket gives them: re-cut into fixed chunks, every byte would be copied
        # three more times into fresh memory (httpx's ByteChunker), costing more CPU than the copy.
        yield from paced(response.iter_bytes(), client.stall_window)
    except (httpx.HTTPError, TimeoutError) as exc:  # the cause says it is worth retrying (a dropped connection)
        raise RegistryError(f"{client.host}: {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        response.close()
