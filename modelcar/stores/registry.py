"""A registry (OCI distribution API) as a store: our own thin client on httpx.

Why not oras-py (DESIGN.md section 8): it holds whole blobs in memory, re-serialises manifests,
cannot mount across repositories, ignores Retry-After and shares one bearer token across
scopes. Here blobs stream in 1 MiB chunks, manifests go up as the exact bytes we hashed,
tokens are cached per scope, and every call retries the way the registry asks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from modelcar.auth import DOCKER_HUB_NAMES, Credentials, find_credentials
from modelcar.errors import DigestMismatch, InputError, IntegrityError, ModelcarError
from modelcar.fsutil import Chunk
from modelcar.image import MEDIA_INDEX, MEDIA_MANIFEST, Descriptor, digest_of
from modelcar.retry import RETRY_STATUS, RetryGiveUp, RetryPolicy, call_with_retry
from modelcar.sockets import read_larger
from modelcar.stores import DEFAULT_MAX_LAYER, BlobSource, Store, registry_prefix_problem

log = logging.getLogger("modelcar")
T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join(
    [
        MEDIA_INDEX,
        MEDIA_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


class RegistryError(ModelcarError):
    pass


class AuthError(RegistryError):
    pass


def _hostname(host: str) -> str:
    """HOST of HOST[:PORT], an IPv6 address without its brackets."""
    try:
        return urlsplit("//" + host).hostname or host
    except ValueError:  # not a host at all: refused where it is used
        return host


def is_loopback(host: str) -> bool:
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries: which hosts speak plain HTTP, which CA to trust, upload chunking.
    `create` adds the hosts of MODELCAR_INSECURE_REGISTRIES; the constructor takes only what it is given."""

    insecure: frozenset[str] = frozenset()
    ca_file: Path | None = None
    chunk_size: int = 0  # 0: one streaming request per blob; N: PATCH chunks of N bytes
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_layer_size: int = DEFAULT_MAX_LAYER

    @classmethod
    def create(
        cls,
        insecure: Iterable[str] = (),
        ca_file: Path | None = None,
        chunk_size: int = 0,
        retry: RetryPolicy | None = None,
        max_layer_size: int = DEFAULT_MAX_LAYER,
    ) -> RegistryOptions:
        hosts = set(insecure)
        hosts |= {h.strip() for h in os.environ.get("MODELCAR_INSECURE_REGISTRIES", "").split(",") if h.strip()}
        return cls(frozenset(hosts), ca_file, chunk_size, retry or RetryPolicy(), max_layer_size)

    def scheme(self, host: str) -> str:
        return "http" if is_loopback(host) or host in self.insecure else "https"


class _Retryable(Exception):
    """A response the registry asks us to try again (429, 5xx); `response` feeds the retry rules."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


_PARAM = re.compile(r'(\w+)="([^"]*)"')


MANIFEST_MAX = 4 << 20  # bytes of a manifest or index read at most (containerd's limit)
TOKEN_MAX = 1 << 20  # bytes of a token service's answer read at most
MANIFEST_ATTEMPTS = 4  # a manifest PUT answered "blob unknown" for blobs just stored: see put_manifest
# A blob this small (an image config, a layer of small JSON files) costs less to send again than a
# round trip to ask whether the registry has it: put_blob does not ask.
SMALL_BLOB = 256 * 1024


PATCH_OK = (202, 201)  # 202 Accepted is the spec's; ECR answers 201 Created to a chunk (DESIGN.md section 8)
# A PATCH body refused as such: no PATCH at all (405, as Artifact Registry says of chunks), a body
# over a cap (413 from a proxy, 416 REQUESTED_RANGE_NOT_SATISFIABLE from GHCR over 4 MiB)
PATCH_REFUSED = (405, 413, 416)
ERROR_BODY_MAX = 64 * 1024  # of a streamed error answer, read for its message


def _error_body(response: httpx.Response) -> bytes:
    """The body of an error answer; of a streamed one (a blob GET answered 404), its first
    ERROR_BODY_MAX bytes: error documents are small, a misbehaving server's need not be."""
    try:
        return response.content
    except httpx.ResponseNotRead:
        pass
    body = b""
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= ERROR_BODY_MAX:
                break
    except httpx.HTTPError:
        pass
    finally:
        response.close()
    return body[:ERROR_BODY_MAX]


def _registry_message(response: httpx.Response) -> str:
    try:
        errors = json.loads(_error_body(response)).get("errors") or []
        if errors:
            return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError):
        pass
    return response.reason_phrase


def _origin(url: str) -> tuple[str, str, int]:
    u = httpx.URL(url)
    return u.scheme, u.host, u.port or (443 if u.scheme == "https" else 80)


def _tls_problem(exc: BaseException) -> str | None:
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, ssl.SSLError):
            return getattr(cur, "verify_message", None) or getattr(cur, "reason", None) or str(cur)
        text = str(cur)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return "certificate verify failed"
        cur = cur.__cause__ or cur.__context__
    return None


class _SystemCAContext(ssl.SSLContext):
    """`ssl.create_default_context()` whose system CAs load at the first TLS handshake.

    Parsing the system CA bundle costs ~50 ms, a tenth of a no-op build's start-up, and a
    plain-HTTP registry (loopback, a CI mirror) never needs it. Verification is unchanged:
    PROTOCOL_TLS_CLIENT requires a valid certificate and a matching host name, and no socket
    is wrapped before the CAs are in.
    """

    _lock = threading.Lock()
    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self.load_default_certs(ssl.Purpose.SERVER_AUTH)
                    self._loaded = True

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load()
        return super().wrap_bio(*args, **kwargs)


class RegistryClient:
    """One registry host: auth, retries, and the distribution API calls modelcar needs.
    `namespace` (the path of the store's prefix) picks credentials kept per namespace."""

    def __init__(self, host: str, options: RegistryOptions, namespace: str = "") -> None:
        self.host = host
        self.namespace = namespace
        self.options = options
        # Plain HTTP is allowed for loopback hosts, but a local registry may still serve TLS: that is
        # found out with one plain request before the first real one (see _probe_scheme).
        scheme = options.scheme(host)
        self._probe = scheme == "http" and host not in options.insecure
        # Docker Hub's API answers at registry-1.docker.io, whatever name the image reference uses.
        self._base = f"{scheme}://{'registry-1.docker.io' if host in DOCKER_HUB_NAMES else host}"
        context = _SystemCAContext(ssl.PROTOCOL_TLS_CLIENT)
        if options.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(options.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"--ca-file {options.ca_file}: cannot load ({exc})") from None
        read_larger(httpcore.HTTP11Connection)  # blob reads: a quarter of the rounds per GiB
        # Loopback traffic never goes through a proxy, as Go's clients (docker, skopeo) have it:
        # httpx sends it wherever HTTP(S)_PROXY says (NO_PROXY's 127.0.0.0/8 form is not read), and
        # a local registry's requests, Basic credentials and all, went to the proxy.
        direct = {"localhost", "127.0.0.1", "::1"} | ({_hostname(host)} if is_loopback(host) else set())
        self.http = httpx.Client(
            verify=context,
            timeout=httpx.Timeout(60.0, read=600.0, write=600.0),
            mounts={f"all://[{name}]" if ":" in name else f"all://{name}": None for name in direct},
        )
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._realm: dict[str, str] | None = None  # bearer challenge parameters, once seen
        self._basic = False
        self._tokens: dict[str, str] = {}  # scope set -> bearer token
        self._flights: dict[str, threading.Lock] = {}  # scope set -> held while its token is fetched
        self.no_streaming = False  # a streamed upload (one PATCH of a whole blob) was refused here
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()  # credentials lookup and scheme probe, once per client

    @property
    def base(self) -> str:
        if self._probe:
            with self._setup_lock:
                if self._probe:
                    self._base = f"{self._probe_scheme()}://{self.host}"
                    self._probe = False
        return self._base

    def _probe_scheme(self) -> str:
        """HTTP or HTTPS for a loopback host: ask `/v2/` over plain HTTP once. A TLS server answers
        that with a 400 saying it wants HTTPS (Go, nginx), or with bytes that are not HTTP."""
        try:
            r = self.http.get(f"http://{self.host}/v2/", timeout=10.0)
        except httpx.RemoteProtocolError:
            return "https"
        except httpx.HTTPError:
            return "http"  # down or unreachable: the real request reports it
        if r.status_code == 400 and "https" in r.text.lower():
            log.debug("%s: serves HTTPS", self.host)
            return "https"
        return "http"

    # --- auth ---------------------------------------------------------------------------------

    @property
    def credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            with self._setup_lock:  # a credential helper runs once, not once per upload thread
                if not self._creds_loaded:
                    self._creds = find_credentials(self.host, self.namespace)
                    self._creds_loaded = True
        return self._creds

    def _who(self) -> str:
        creds = self.credentials
        if creds is None:
            return "anonymous"
        return (
            f"the identity token from {creds.source}"
            if creds.is_identity_token
            else f"user {creds.username!r} from {creds.source}"
        )

    def _fetch_token(self, scopes: tuple[str, ...]) -> str:
        assert self._realm is not None
        realm = self._realm["realm"]
        params: list[tuple[str, str | int | float | bool | None]] = [("service", self._realm.get("service", ""))]
        params += [("scope", s) for s in scopes]
        creds = self.credentials
        try:
            if creds is not None and creds.is_identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.password,
                    "service": self._realm.get("service", ""),
                    "client_id": "modelcar",  # the distribution token spec requires one (docker sends "docker")
                }
                form["scope"] = " ".join(scopes)
                request = self.http.build_request("POST", realm, data=form)
            else:
                headers = {"Authorization": creds.basic()} if creds else {}
                request = self.http.build_request("GET", realm, params=params, headers=headers)
            r = self.http.send(request, stream=True)
            try:
                body = _read_capped(r, TOKEN_MAX)  # an error's too: a connection closed unread is reset
            finally:
                r.close()
        except httpx.HTTPError as exc:
            raise AuthError(f"{self.host}: token service {realm} unreachable ({type(exc).__name__})") from None
        if r.status_code in (401, 403):
            raise AuthError(
                f"{self.host}: authentication failed for {self._who()}: check the password, or run "
                f"`docker login {self.host}` (or set REGISTRY_AUTH_FILE)"
            )
        if r.status_code in RETRY_STATUS:  # a busy token service (429, 5xx): retried like the registry
            raise _Retryable(r)
        if r.status_code != 200:
            raise AuthError(f"{self.host}: token service {realm} answered HTTP {r.status_code}")
        if body is None:
            raise AuthError(f"{self.host}: token service {realm} sent more than {TOKEN_MAX} bytes: not a token")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AuthError(f"{self.host}: token service {realm} did not answer with a JSON object")
        token = data.get("token") or data.get("access_token")
        if not token:
            raise AuthError(f"{self.host}: token service {realm} returned no token")
        return str(token)

    def _on_challenge(self, response: httpx.Response, scopes: tuple[str, ...], sent: str | None, retried: bool) -> None:
        """Answer a 401 to a request that carried `sent` (its Authorization header, or None): with
        credentials, or a token for these scopes; on a second 401, a token that lacks the scope is a
        permission error, anything else gets a fresh token."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme = header.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self.credentials is None:
                raise AuthError(
                    f"{self.host}: authentication required: run `docker login {self.host}` or set REGISTRY_AUTH_FILE"
                )
            if sent is not None and sent.startswith("Basic "):
                raise AuthError(
                    f"{self.host}: authentication failed for {self._who()}: check the password, or run "
                    f"`docker login {self.host}`"
                )
            self._basic = True  # a request sent before another thread learnt this: just send it again
            return
        if scheme == "bearer":
            params = dict(_PARAM.findall(header))
            if retried and params.get("error") == "insufficient_scope":
                raise AuthError(
                    f"{self.host}: {self._who()} is not granted {' '.join(scopes)}: "
                    "ask the registry's admin for that access to the repository"
                )
            realm = params.get("realm", "")
            if self._base.startswith("https://") and not realm.startswith("https://"):
                # the token request carries the registry's credentials: not in the clear, not to a
                # server the registry's TLS does not vouch for
                raise AuthError(
                    f"{self.host}: the registry asks for a token from {realm or '(no realm)'}, not over HTTPS: "
                    "credentials are not sent there"
                )
            with self._lock:
                self._realm = {"realm": realm, "service": params.get("service", "")}
            stale = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
            self._token(scopes, stale)
            return
        raise AuthError(f"{self.host}: unsupported authentication challenge {scheme or '(none)'}")

    def _token(self, scopes: tuple[str, ...], stale: str | None = None) -> str:
        """The cached token for these scopes, fetched when there is none or it is `stale` (refused).

        One fetch per scope set at a time: threads that need the same token wait for the one
        fetching it, and a thread whose token was refused uses a fresher one another thread got.
        """
        key = " ".join(scopes)
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            with self._lock:
                token = self._tokens.get(key)
            if token is not None and token != stale:
                return token
            token = self._fetch_token(scopes)
            with self._lock:
                self._tokens[key] = token
            return token

    def _auth_header(self, scopes: tuple[str, ...]) -> str | None:
        if self._basic and self.credentials is not None:
            return self.credentials.basic()
        with self._lock:
            if self._realm is None:
                return None
        return f"Bearer {self._token(scopes)}"

    # --- requests -----------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return urljoin(self.base + "/", path)

    @staticmethod
    def location(response: httpx.Response, current: str | None = None) -> str:
        """Where an upload goes on: the answer's `Location`, which may be relative to the URL the
        request went to (`<uuid>?_state=...` after a POST to `.../blobs/uploads/`), not only to
        the registry's root; without one, where it was going."""
        if (loc := response.headers.get("Location")) is None:
            if current is None:
                raise RegistryError(f"{response.request.url.host}: the upload answer has no Location")
            return current
        return urljoin(str(response.request.url), str(loc))

    def _send_once(
        self,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None,
        body: Callable[[], Iterable[bytes] | bytes] | None,
        stream: bool,
        redirects: bool,
    ) -> httpx.Response:
        """One request, re-sent once with fresh credentials on 401 (also after a streamed body),
        or once when the host a GET was redirected to refuses it (a signed URL that expired on
        the way: the registry hands out a new one).

        Credentials go only to the registry's own origin. An upload session's `Location` may name
        another host (blob storage, or this one over plain HTTP behind a proxy that rewrote it);
        httpx drops credentials on a redirect to another origin, not on a URL the server hands out.
        """
        ours = _origin(url) == _origin(self.base)
        for attempt in range(3):
            h = dict(headers or {})
            if ours and (auth := self._auth_header(scopes)):
                h["Authorization"] = auth
            else:
                auth = None
            content = body() if body is not None else None
            request = self.http.build_request(method, url, headers=h, content=content)
            tls_error = None
            try:
                response = self.http.send(request, stream=stream, follow_redirects=redirects)
            except httpx.HTTPError as exc:
                if (tls := _tls_problem(exc)) is None:
                    raise
                tls_error = tls
            if tls_error is not None:
                # Raised outside the handler, without the connection error as its context: a
                # certificate the client does not trust is not worth retrying.
                raise RegistryError(
                    f"{self.host}: TLS failure ({tls_error}): pass --ca-file with the registry's CA "
                    f"certificate, or --insecure-registry {self.host} if it serves plain HTTP"
                )
            if response.status_code == 401 and attempt < 2 and ours and _origin(str(response.url)) == _origin(url):
                response.close()
                self._on_challenge(response, scopes, auth, retried=attempt == 1)
                continue
            if response.status_code in (401, 403) and response.history and attempt == 0:
                response.close()
                continue
            if response.status_code in RETRY_STATUS:
                response.close()
                raise _Retryable(response)
            return response
        return response

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        scopes: tuple[str, ...],
        what: str,
        headers: dict[str, str] | None = None,
        body: Callable[[], Iterable[bytes] | bytes] | None = None,
        stream: bool = False,
        retry: bool = True,
        redirects: bool | None = None,
    ) -> httpx.Response:
        """One API call. With `retry=False` failures propagate raw, for a caller that retries a
        whole sequence (an upload restarts from a new session) and guards it itself. Redirects
        are followed for GET and HEAD unless `redirects` says otherwise."""
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        follow = method in ("GET", "HEAD") if redirects is None else redirects

        def once() -> httpx.Response:
            return self._send_once(method, url, scopes, headers, body, stream, follow)

        if not retry:
            return once()
        response: httpx.Response = self.guard(lambda: call_with_retry(once, what, self.options.retry), what)
        return response

    def guard(self, fn: Callable[[], T], what: str) -> T:
        """Turn transport failures into one-line errors that name the registry and what to do."""
        try:
            return fn()
        except RetryGiveUp as exc:
            raise RegistryError(f"{self.host}: {exc}") from None
        except ModelcarError:
            raise
        except _Retryable as exc:
            raise RegistryError(f"{self.host}: {what}: HTTP {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            if tls := _tls_problem(exc):
                raise RegistryError(
                    f"{self.host}: TLS failure ({tls}): pass --ca-file with the registry's CA certificate, "
                    f"or --insecure-registry {self.host} if it serves plain HTTP"
                ) from None
            raise RegistryError(f"{self.host}: {what}: {type(exc).__name__}: {exc}") from None

    def check(
        self, response: httpx.Response, ok: tuple[int, ...], what: str, scopes: tuple[str, ...], too_large: str = ""
    ) -> None:
        """Raise what a refusal means. `too_large`: what to do when the body was too large for it."""
        if response.status_code in ok:
            return
        if too_large and response.status_code in (413, 416):
            raise RegistryError(
                f"{self.host}: {what}: HTTP {response.status_code}: {_registry_message(response)}; {too_large}"
            )
        if response.status_code in (401, 403) and (sent_to := _origin(str(response.request.url))) != _origin(self.base):
            scheme, host, port = sent_to
            if response.status_code == 401 and not response.history:
                raise AuthError(
                    f"{self.host}: {what}: the registry sent the request to {scheme}://{host}:{port}, which asks "
                    f"for credentials: they are sent to {self.base} only"
                )
            raise RegistryError(
                f"{self.host}: {what}: the registry sent it on to {scheme}://{host}:{port}, which refused it "
                f"(HTTP {response.status_code}): a signed URL that expired, or a host this network may not use; "
                "try again, or ask the registry's operators"
            )
        if response.status_code == 401:
            raise AuthError(f"{self.host}: {what}: not authorized for {self._who()} ({', '.join(scopes)})")
        if response.status_code == 403:
            raise AuthError(f"{self.host}: {what}: {self._who()} is denied ({', '.join(scopes)}): ask for that access")
        raise RegistryError(f"{self.host}: {what}: HTTP {response.status_code}: {_registry_message(response)}")


def _scopes(repo: str, write: bool, mount_from: str | None = None) -> tuple[str, ...]:
    scopes = [f"repository:{repo}:{'pull,push' if write else 'pull'}"]
    if mount_from is not None:
        scopes.append(f"repository:{mount_from}:pull")
    return tuple(scopes)


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + digest


class RegistryStore(Store):
    """Images under a repository prefix of one registry: `HOST[:PORT]/PATH`."""

    retries_puts = True

    def close(self, commit: bool = True) -> None:
        self.client.http.close()

    def __init__(self, prefix: str, options: RegistryOptions | None = None, *, write: bool = False) -> None:
        if (problem := registry_prefix_problem(prefix.rstrip("/"))) is not None:
            raise InputError(problem)
        host, _, path = prefix.partition("/")
        if "." not in host and ":" not in host and host != "localhost":
            raise InputError(f"{prefix!r} is not a registry prefix: use HOST[:PORT]/PATH, with a dot or a port in HOST")
        self.host = host
        self.path = path.strip("/")
        self.prefix = prefix.rstrip("/")
        self.client = RegistryClient(host, options or RegistryOptions.create(), self.path)
        self.write = write
        self.max_blob_size = self.client.options.max_layer_size or None
        self._seen: dict[str, set[str]] = {}  # digest -> repositories known to hold it
        self._missing: set[tuple[str, str]] = set()  # (repo, digest) a HEAD in this run found absent
        self._manifests: dict[tuple[str, str], Future[bytes]] = {}  # (repo, digest) -> bytes
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
        if self._mount_source(repo, digest) is None:
            return False
        r, scopes = self._start_upload(repo, digest, retry=True)
        if r is None:
            self._note(digest, repo)
            return True
        # not mounted (the registry opened an upload session instead): closed, the blob is sent later
        with suppress(Exception):  # best effort: a registry expires an idle session anyway
            self.client.request(
                "DELETE", self.client.location(r), scopes=scopes, what=f"{repo}: end upload", retry=False
            )
        return False

    def _start_upload(
        self, repo: str, digest: str | None, *, retry: bool
    ) -> tuple[httpx.Response | None, tuple[str, ...]]:
        """POST an upload session, asking the registry to mount `digest` from another repository
        of it known to hold the blob: (None when it did, else the session's answer; the scopes)."""
        mount_from = self._mount_source(repo, digest)
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
        scopes = _scopes(repo, self.write)
        what = f"{repo}: HEAD {kind} {ref}"
        # A blob the registry serves from elsewhere (a CDN, a signed storage URL) is answered with a
        # redirect there: it has the blob. Followed, the signed URL (made for a GET) may refuse a HEAD.
        path = f"/v2/{repo}/{kind}/{ref}"
        r = self.client.request("HEAD", path, scopes=scopes, what=what, headers=headers, redirects=kind != "blobs")
        if r.is_redirect:
            if _origin(self.client.location(r)) != _origin(str(r.request.url)):
                return True
            r = self.client.request("HEAD", path, scopes=scopes, what=what, headers=headers, redirects=True)
        if r.status_code == 404:
            return False
        self.client.check(r, (200,), what, scopes)
        return True

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
            others = sorted(self._seen.get(digest, set()) - {repo})
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
            if r.status_code in PATCH_REFUSED and digest is None:
                # Its digest is not known before the blob is read, so a streamed upload was the one
                # read; this registry wants the digest up front: hash first, then one PUT, here on.
                c.no_streaming = True
                log.info(
                    "%s: a streamed upload was refused (HTTP %d: %s): each new layer is hashed first, then "
                    "sent in one PUT",
                    c.host,
                    r.status_code,
                    _registry_message(r),
                )
                return self._upload(repo, size, source, None)
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
        scopes = _scopes(repo, self.write)
        what = f"{repo}: GET {digest}"
        r = self.client.request("GET", f"/v2/{repo}/blobs/{digest}", scopes=scopes, what=what, stream=True)
        try:
            self.client.check(r, (200,), what, scopes)
        except BaseException:
            r.close()
            raise
        return _iter_response(r, self.client, what)

    def has_manifest(self, repo: str, ref: str) -> bool:
        """Whether the registry holds this manifest or index (HEAD, by tag or digest)."""
        return self._exists(repo, "manifests", ref, {"Accept": MANIFEST_ACCEPT})

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
            log.debug("%s: %s; asking again", what, _registry_message(r))
            time.sleep(0.25 * attempt)
        message = _registry_message(r)
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
        with self._lock:
            flight = self._manifests.get((repo, ref))
            first = flight is None
            if flight is None:
                flight = self._manifests[(repo, ref)] = Future()
        if first:
            try:
                flight.set_result(self._get_manifest(repo, ref))
            except BaseException as exc:
                with self._lock:
                    del self._manifests[(repo, ref)]  # a later reader asks again
                flight.set_exception(exc)
        return flight.result()

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
                _error_body(r)  # read, so that the connection is not reset
                raise RegistryError(f"{self.host}/{repo}: manifest {ref} not found")
            self.client.check(r, (200,), what, scopes)
            # read up to a cap, as containerd does: a server that sends without end is cut off
            try:
                body = _read_capped(r, MANIFEST_MAX)
            except httpx.HTTPError as exc:  # the cause says it is worth retrying (a dropped connection)
                raise RegistryError(f"{self.host}: {what}: {type(exc).__name__}: {exc}") from exc
        finally:
            r.close()
        if body is None:
            raise RegistryError(f"{self.host}: {what}: larger than {MANIFEST_MAX} bytes: not a manifest")
        if ref.startswith("sha256:") and digest_of(body) != ref:
            raise IntegrityError(f"{self.host}/{repo}: manifest {ref} has digest {digest_of(body)}")
        return body


def _blob_not_settled(response: httpx.Response) -> bool:
    return response.status_code == 400 and "MANIFEST_BLOB_UNKNOWN" in _registry_message(response)


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


def _read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """A streamed answer's body, None past `cap` bytes (a server sending without end is cut off
    there, as containerd cuts a manifest off at 4 MiB)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _iter_response(response: httpx.Response, client: RegistryClient, what: str) -> Iterator[bytes]:
    try:
        # The pieces as the socket gives them: re-cut into fixed chunks, every byte would be copied
        # three more times into fresh memory (httpx's ByteChunker), costing more CPU than the copy.
        yield from response.iter_bytes()
    except httpx.HTTPError as exc:  # the cause says it is worth retrying (a dropped connection)
        raise RegistryError(f"{client.host}: {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        response.close()
