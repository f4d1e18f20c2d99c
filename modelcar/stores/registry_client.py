"""Talking to a registry (OCI distribution API) over HTTP: scheme, TLS, credentials, bearer
tokens per scope, retries the way the registry asks, and errors that say what to do.

The store (`registry.RegistryStore`) says what to send; this says how, so every request, blob or
manifest, gets the same authentication, redirect and retry rules.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from modelcar.auth import DOCKER_HUB_NAMES, Credentials, find_credentials
from modelcar.errors import ModelcarError, printable, without_credentials
from modelcar.retry import RETRY_STATUS, RetryGiveUp, RetryPolicy, Unreachable, call_with_retry
from modelcar.sockets import read_larger
from modelcar.stall import STALL_WINDOW, paced, read_capped
from modelcar.stores import DEFAULT_MAX_LAYER

log = logging.getLogger("modelcar")
T = TypeVar("T")


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
    auth_file: Path | None = None  # the only credentials file read (None: the environment's, see auth)

    @classmethod
    def create(
        cls,
        insecure: Iterable[str] = (),
        ca_file: Path | None = None,
        chunk_size: int = 0,
        retry: RetryPolicy | None = None,
        max_layer_size: int = DEFAULT_MAX_LAYER,
        auth_file: Path | None = None,
    ) -> RegistryOptions:
        hosts = set(insecure)
        hosts |= {h.strip() for h in os.environ.get("MODELCAR_INSECURE_REGISTRIES", "").split(",") if h.strip()}
        return cls(frozenset(hosts), ca_file, chunk_size, retry or RetryPolicy(), max_layer_size, auth_file)

    def scheme(self, host: str) -> str:
        return "http" if is_loopback(host) or host in self.insecure else "https"


class _Retryable(Exception):
    """A response the registry asks us to try again (429, 5xx); `response` feeds the retry rules,
    `said` what its error document says (Docker Hub's pull limit says to log in), for the give-up."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.said = said(response)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_PART = re.compile(
    # a bare value is taken up to the next comma or space, a URL's `:` and `/` too (not tchars, but sent)
    rf'[\s,]*(?:(?P<name>{_TOKEN})\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^\s,"=][^\s,"]*)|(?P<scheme>{_TOKEN})(?=[\s,]|$)|[^\s,]+)'
)


def challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges of a WWW-Authenticate header (RFC 9110 11.6.1): (scheme, parameters), scheme
    and parameter names lowercased, values unquoted. One header may hold several, comma-separated
    (`Bearer realm="...",service="...", Basic realm="..."`; httpx joins repeated headers so too),
    and a value may be bare (`service=registry.example.com`). A token68 (`Negotiate abc==`)
    is skipped: no registry answers with one alone."""
    out: list[tuple[str, dict[str, str]]] = []
    for m in _CHALLENGE_PART.finditer(header):
        if m["scheme"] is not None:
            out.append((m["scheme"].lower(), {}))
        elif m["name"] is not None and out:
            value = m["value"]
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            out[-1][1].setdefault(m["name"].lower(), value)
    return out


TOKEN_MAX = 1 << 20  # bytes of a token service's answer read at most
ERROR_BODY_MAX = 64 * 1024  # of a streamed error answer, read for its message


ERROR_BODY_WAIT = 5.0  # seconds a streamed error answer's body is waited for, per read and in all


def error_body(response: httpx.Response) -> bytes:
    """The body of an error answer; of a streamed one (a blob GET answered 404), what of its first
    ERROR_BODY_MAX bytes comes within ERROR_BODY_WAIT: error documents are small and sent at once, a
    misbehaving server's need not be (a 503 page that stalls held each attempt for the read timeout)."""
    try:
        return response.content
    except httpx.ResponseNotRead:
        pass
    timeout = response.request.extensions.get("timeout")
    if isinstance(timeout, dict):  # this request's own (httpx makes one per request), read as the body is
        timeout["read"] = min(timeout.get("read") or ERROR_BODY_WAIT, ERROR_BODY_WAIT)
    body = b""
    try:
        for chunk in paced(response.iter_bytes(), ERROR_BODY_WAIT):
            body += chunk
            if len(body) >= ERROR_BODY_MAX:
                break
    except (httpx.HTTPError, TimeoutError):
        pass
    finally:
        response.close()
    return body[:ERROR_BODY_MAX]


def registry_message(response: httpx.Response) -> str:
    return said(response) or response.reason_phrase


SAID_MAX = 300  # characters of a registry's error document quoted in a message


def said(response: httpx.Response) -> str:
    """What a refusal's error document says, if it has one (`DENIED: requested access to the
    resource is denied`, GHCR's `permission_denied: write_package`), else nothing; short."""
    try:
        errors = json.loads(error_body(response)).get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except Exception:  # a body already gone, not JSON, not an error document: nothing said
        return ""
    # a server's words: no credentials a URL in them carried (before the cut, which could split
    # one from the `@` that marks it), no control characters, one line
    text = printable(" ".join(without_credentials(text).split()))
    return text if len(text) <= SAID_MAX else text[: SAID_MAX - 3] + "..."


def origin(url: str) -> tuple[str, str, int]:
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
    """A client context (PROTOCOL_TLS_CLIENT, as `ssl.create_default_context()` makes, without the
    stricter X.509 checks that adds from Python 3.13) whose system CAs load at the first TLS handshake.

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
            # Bodies as they are: blobs are sent by digest, and a manifest's cap is on what is held:
            # 5 KB of nested gzip a server sent anyway decoded to 3 GiB in memory (see _send_once).
            headers={"Accept-Encoding": "identity"},
            # a registry may take minutes to answer the PUT that ends a 10 GB upload; no wait is
            # longer than --retry-deadline, all a call may take (a stalled one outlived it 600 s)
            timeout=httpx.Timeout(
                min(60.0, options.retry.deadline),
                read=min(600.0, options.retry.deadline),
                write=min(600.0, options.retry.deadline),
            ),
            mounts={f"all://[{name}]" if ":" in name else f"all://{name}": None for name in direct},
        )
        # a transfer that moves almost nothing for this long fails (paced), within --retry-deadline
        self.stall_window = min(STALL_WINDOW, options.retry.deadline)
        self.unreachable = Unreachable(f"the registry {host}")
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._oauth_form = True  # an identity token is exchanged by the OAuth form, where the service takes it
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
                    self._creds = find_credentials(self.host, self.namespace, self.options.auth_file)
                    self._creds_loaded = True
        return self._creds

    def _renewed(self, refused: Credentials) -> bool:
        """Whether credentials refused now were a helper's and it hands out others: asked once per
        refusal of the credentials in use (another thread's renewal counts), and the tokens they
        got are dropped."""
        if not refused.renewable:
            return False
        with self._setup_lock:
            if self._creds is refused:
                fresh = find_credentials(self.host, self.namespace, self.options.auth_file)
                if fresh is None or (fresh.username, fresh.password) == (refused.username, refused.password):
                    return False
                self._creds = fresh
                log.debug("%s: %s was refused; asked it again", self.host, refused.source)
        with self._lock:
            self._tokens.clear()
        return self._creds is not None

    def _login(self) -> str:
        """What to do about this client's credentials, where they come from."""
        if self.options.auth_file is not None:  # a library caller's own file, the only one read
            return f"put this registry's credentials in {self.options.auth_file}"
        return f"run `docker login {self.host}` (or set REGISTRY_AUTH_FILE)"

    def _refused(self) -> AuthError:
        return AuthError(
            f"{self.host}: authentication failed for {self._who()}: check the password, or {self._login()}"
        )

    def _who(self) -> str:
        creds = self.credentials
        if creds is None:
            return "anonymous"
        return (
            f"the identity token from {creds.source}"
            if creds.is_identity_token
            else f"user {creds.username!r} from {creds.source}"
        )

    def _fetch_token(self, scopes: tuple[str, ...], renewed: bool = False) -> str:
        assert self._realm is not None
        realm = self._realm["realm"]
        service = [("service", self._realm["service"])] if "service" in self._realm else []
        creds = self.credentials

        def ask(request: httpx.Request) -> tuple[httpx.Response, bytes | None]:
            r = as_it_is(self.http.send(request, stream=True))
            try:
                return r, read_capped(r, TOKEN_MAX, self.stall_window)  # an error's too: one closed unread is reset
            finally:
                r.close()

        headers = {"Authorization": creds.basic()} if creds else {}
        # the realm's own query (a tenant, an account) stays: the service and scopes go after it
        url = httpx.URL(realm).copy_merge_params([*service, *(("scope", s) for s in scopes)])
        try:
            if creds is not None and creds.is_identity_token and self._oauth_form:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.password,
                    **dict(service),
                    "client_id": "modelcar",  # the distribution token spec requires one (docker sends "docker")
                    "scope": " ".join(scopes),
                }
                r, body = ask(self.http.build_request("POST", realm, data=form))
                if r.status_code in (404, 405):  # a token service without the OAuth form: asked as docker does then
                    log.debug("%s: token service %s takes no OAuth form (HTTP %d)", self.host, realm, r.status_code)
                    self._oauth_form = False  # nor is it asked so again in this run
                    r, body = ask(self.http.build_request("GET", url, headers=headers))
            else:
                r, body = ask(self.http.build_request("GET", url, headers=headers))
        except (httpx.HTTPError, TimeoutError) as exc:
            raise AuthError(f"{self.host}: token service {realm} unreachable ({type(exc).__name__})") from None
        log.debug("%s: token for %s from %s: HTTP %d", self.host, " ".join(scopes), realm, r.status_code)
        if r.status_code in (401, 403):
            if creds is not None and not renewed and self._renewed(creds):
                return self._fetch_token(scopes, renewed=True)
            raise self._refused()
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
        header = ", ".join(response.headers.get_list("WWW-Authenticate"))
        offered = dict(reversed(challenges(header)))
        # a token service hands anonymous users tokens too, and takes a user's password for one
        scheme = "bearer" if "bearer" in offered else "basic" if "basic" in offered else next(iter(offered), "")
        if scheme == "basic":
            if self.credentials is None:
                raise AuthError(f"{self.host}: authentication required: {self._login()}")
            creds = self.credentials
            if sent is not None and sent.startswith("Basic "):
                if not retried and (sent != creds.basic() or self._renewed(creds)):
                    return  # sent again, with the helper's fresh ones (another thread's renewal, or this)
                raise self._refused()
            self._basic = True  # a request sent before another thread learnt this: just send it again
            return
        if scheme == "bearer":
            params = offered["bearer"]
            if retried and params.get("error") == "insufficient_scope" and self.credentials is None:
                raise AuthError(f"{self.host}: anonymous access is not granted {' '.join(scopes)}: {self._login()}")
            if retried and params.get("error") == "insufficient_scope":
                raise AuthError(
                    f"{self.host}: {self._who()} is not granted {' '.join(scopes)}: "
                    "ask the registry's admin for that access to the repository"
                )
            realm = params.get("realm", "")
            if not realm.startswith(("https://", "http://")):  # asked again, the same answer: no retry
                raise AuthError(f"{self.host}: the registry's token challenge names no token service URL ({realm!r})")
            if self._base.startswith("https://") and not realm.startswith("https://"):
                # the token request carries the registry's credentials: not in the clear, not to a
                # server the registry's TLS does not vouch for
                raise AuthError(
                    f"{self.host}: the registry asks for a token from {realm or '(no realm)'}, not over HTTPS: "
                    "credentials are not sent there"
                )
            with self._lock:
                self._realm = {"realm": realm} | ({"service": params["service"]} if "service" in params else {})
            stale = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
            self._token(scopes, stale)
            return
        if not scheme:
            got = "no WWW-Authenticate header"
            if header.strip():
                got = f"a WWW-Authenticate header naming no challenge ({printable(header[:100])!r})"
            raise AuthError(
                f"{self.host}: HTTP 401 with {got}, nothing saying how to log in: is a proxy in front of the "
                "registry answering?"
            )
        raise AuthError(f"{self.host}: unsupported authentication challenge {scheme}")

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
        ours = origin(url) == origin(self.base)
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
            else:
                via = f" (answered by {response.url.host})" if origin(str(response.url)) != origin(url) else ""
                log.debug("%s %s: HTTP %d%s", method, url.split("?", 1)[0], response.status_code, via)
                as_it_is(response)
            if tls_error is not None:
                # Raised outside the handler, without the connection error as its context: a
                # certificate the client does not trust is not worth retrying.
                raise RegistryError(
                    f"{self.host}: TLS failure ({tls_error}): pass --ca-file with the registry's CA "
                    f"certificate, or --insecure-registry {self.host} if it serves plain HTTP"
                )
            if response.status_code == 401 and attempt < 2 and ours and origin(str(response.url)) == origin(url):
                response.close()
                self._on_challenge(response, scopes, auth, retried=attempt == 1)
                continue
            if response.status_code in (401, 403) and response.history and attempt == 0:
                response.close()
                continue
            if response.status_code in RETRY_STATUS:
                retryable = _Retryable(response)  # its error document read first
                response.close()
                raise retryable
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
        self.unreachable.check(f"{self.host}: {what}", RegistryError)
        try:
            return fn()
        except RetryGiveUp as exc:
            self.unreachable.note(exc)
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
        except (httpx.InvalidURL, UnicodeError) as exc:  # a Location no client can follow (idna's errors too)
            raise RegistryError(f"{self.host}: {what}: the registry sent a URL that cannot be used ({exc})") from None

    def check(
        self, response: httpx.Response, ok: tuple[int, ...], what: str, scopes: tuple[str, ...], too_large: str = ""
    ) -> None:
        """Raise what a refusal means. `too_large`: what to do when the body was too large for it."""
        if response.status_code in ok:
            return
        text = said(response)  # the error document, read once (a streamed body is gone after)
        message = text or response.reason_phrase
        if too_large and response.status_code in (413, 416):
            raise RegistryError(f"{self.host}: {what}: HTTP {response.status_code}: {message}; {too_large}")
        if response.status_code in (401, 403) and (sent_to := origin(str(response.request.url))) != origin(self.base):
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
        says = f" (the registry says: {text})" if text else ""
        if response.status_code == 401:
            raise AuthError(f"{self.host}: {what}: not authorized for {self._who()} ({', '.join(scopes)}){says}")
        if response.status_code == 403:
            raise AuthError(
                f"{self.host}: {what}: {self._who()} is denied ({', '.join(scopes)}){says}: ask for that access"
            )
        raise RegistryError(f"{self.host}: {what}: HTTP {response.status_code}: {message}")


def as_it_is(response: httpx.Response) -> httpx.Response:
    """`response`, whose body comes as it is (every request asks `Accept-Encoding: identity`); one
    encoded anyway is refused before a byte is decoded: 5 KB of nested gzip decoded to 3 GiB."""
    if (coding := response.headers.get("Content-Encoding", "").strip().lower()) not in ("", "identity"):
        response.close()
        raise RegistryError(
            f"{response.url.host}: {response.request.method} {response.url.path}: the answer came with "
            f"Content-Encoding: {coding}, where none was asked for (identity); not decoded (a proxy between "
            "re-encodes it?)"
        )
    return response
