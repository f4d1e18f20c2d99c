"""A real container registry for tests: Debian's `docker-registry` (distribution 2.8) on loopback.

Usable as a pytest plugin (`pytest_plugins = ["tests.registry"]`). Three set-ups (DESIGN.md section 11):
  plain HTTP without auth       `start_registry(d)`                              fixture `registry`
  htpasswd (bcrypt) over TLS    `start_registry(d, tls=True, htpasswd={...})`    fixture `tls_registry`
  bearer tokens                 `start_registry(d, token=TokenServer(...))`      fixture `token_registry`
The TLS certificate is issued for 127.0.0.1 and localhost by a throw-away CA (`TestCA`); the token server
is a small Python HTTP server signing ES256 JWTs with an `x5c` chain that distribution's `rootcertbundle`
trusts. `fault_proxy` puts a `tests.faultproxy.FaultProxy` in front of the plain registry.

The registries are session-scoped (starting one takes a fraction of a second, but adds up): tests share
them and keep apart by using unique repository names (`Registry.unique_repo()`). The function-scoped
fixtures reset the token server's users, grants, lifetime and counters for every test.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import gzip
import http.client
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.faultproxy import FaultProxy
from tests.httpd import QuietHandler, QuietServer

REGISTRY_BIN = "docker-registry"
SERVICE = "modelcar-test-registry"
ISSUER = "modelcar-test-token-issuer"
# distribution 2.8 accepts a token up to 60 s after its `exp` (token.Leeway); see TokenServer.lifetime.
JWT_LEEWAY = 60


def require_tool(name: str) -> str:
    """tests.conftest.require_tool, imported late: conftest may import this module."""
    from tests.conftest import require_tool as require

    return require(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- certificates ---------------------------------------------------------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


class TestCA:
    """A throw-away certificate authority (EC P-256) that issues server and signing certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "modelcar test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / "ca.crt"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = _write_key(directory / "ca.key", self.key)

    def issue(
        self, name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = True
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
        """A leaf certificate and key, written to `<dir>/<name>.crt` and `<dir>/<name>.key`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.dir / f"{name}.crt"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, key, cert_file, _write_key(self.dir / f"{name}.key", key)


# --- token server ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, unverified: for assertions in tests."""
    header, claims, _ = (base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split("."))
    return json.loads(header), json.loads(claims)


@dataclass
class TokenRequest:
    user: str  # "" when the request carried no credentials
    service: str | None
    scopes: list[str]  # as requested
    granted: list[dict[str, Any]]  # the token's `access` claim
    grant_type: str | None = None  # a POST's (OAuth2) grant; None for a GET
    client_id: str | None = None  # a POST's


Grants = Mapping[str, Mapping[str, list[str]]]


class TokenServer:
    """A Docker registry token server (https://distribution.github.io/distribution/spec/auth/token/).

    GET /token?service=S&scope=repository:NAME:pull,push[&scope=...] with HTTP basic credentials answers
    `{"token", "access_token", "expires_in", "issued_at"}`. `users` maps user -> password; `grants` maps
    user -> {pattern: actions}, where a pattern is an fnmatch pattern over the repository name (for other
    resource types, over "TYPE:NAME", e.g. "registry:catalog"). Grants under the user "" apply to
    requests without credentials; wrong credentials get 401. Each requested scope is granted the
    intersection of its actions with the allowed ones ("*" allows everything).

    POST /token is the OAuth2 form (https://distribution.github.io/distribution/spec/auth/oauth/), as
    a client with an identity token (`docker login` to a registry that hands out refresh tokens) asks:
    `grant_type=refresh_token&refresh_token=T&service=S&client_id=C&scope=A B`. `refresh_tokens` maps
    T -> user; without a `client_id` (the spec requires one) the answer is 400, an unknown T 401. It
    answers `{"access_token", "scope", "expires_in", "issued_at"}` (no `token` key).

    `lifetime` is how long the registry accepts a token, in seconds. distribution adds 60 s of leeway to
    `exp`, so the `exp` claim is set to `iat + lifetime - 60` (it may lie before `iat`); `expires_in`
    reports `lifetime`, or `reported_expires_in` when that is set (to make a client cache a token that
    the registry will reject with 401 sooner). Docker clients treat an `expires_in` under 60 as 60.

    `scope_counts[scope]` counts token requests per requested scope string ("" for requests without
    a scope); `requests` records each one.
    """

    DEFAULT_USERS: ClassVar[dict[str, str]] = {"alice": "alice-pass", "reader": "reader-pass"}
    DEFAULT_GRANTS: ClassVar[dict[str, dict[str, list[str]]]] = {
        "alice": {"*": ["pull", "push", "delete"]},
        "reader": {"*": ["pull"]},
    }
    DEFAULT_REFRESH_TOKENS: ClassVar[dict[str, str]] = {"alice-refresh-token": "alice"}

    def __init__(
        self,
        directory: Path,
        *,
        users: Mapping[str, str] | None = None,
        grants: Grants | None = None,
        lifetime: int = 300,
        service: str = SERVICE,
        issuer: str = ISSUER,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.service = service
        self.issuer = issuer
        self._defaults = (
            dict(users if users is not None else self.DEFAULT_USERS),
            {u: dict(g) for u, g in (grants if grants is not None else self.DEFAULT_GRANTS).items()},
            lifetime,
        )
        self.users: dict[str, str] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.grants: dict[str, dict[str, list[str]]] = {}
        self.lifetime = lifetime
        self.reported_expires_in: int | None = None
        self.scope_counts: Counter[str] = Counter()
        self.requests: list[TokenRequest] = []
        self.fail_next: list[int] = []  # statuses to answer the next token requests with
        self.padding = 0  # bytes of filler in each token answer (a service that sends without measure)
        self.gzip_next = 0  # token answers to send gzipped twice over, `Content-Encoding: gzip, gzip`
        self._lock = threading.Lock()
        self._gzip_lock = threading.Lock()
        self.reset()

        # distribution verifies the x5c chain against `rootcertbundle`: a CA of its own signs the key.
        self.ca = TestCA(directory / "token-ca", name="modelcar test token CA")
        self.signing_cert, self.signing_key, _, _ = self.ca.issue("token-signer", server=False)
        self.rootcertbundle = self.ca.cert_file
        self._x5c = [base64.b64encode(self.signing_cert.public_bytes(serialization.Encoding.DER)).decode()]

        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:
                server._handle_form(self)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def start(self) -> TokenServer:
        if self.thread is None:
            self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join()
            self.thread = None
        self.server.server_close()

    def reset(self) -> None:
        """Back to the users, grants and lifetime given at construction; counters emptied."""
        with self._lock:
            users, grants, lifetime = self._defaults
            self.users = dict(users)
            self.refresh_tokens = dict(self.DEFAULT_REFRESH_TOKENS)
            self.grants = {u: dict(g) for u, g in grants.items()}
            self.lifetime = lifetime
            self.reported_expires_in = None
            self.scope_counts.clear()
            self.requests.clear()
            self.fail_next.clear()
            self.padding = 0
            self.gzip_next = 0

    def count(self, scope: str | None = None) -> int:
        """Token requests for `scope` (a requested scope string), or all of them."""
        with self._lock:
            return len(self.requests) if scope is None else self.scope_counts[scope]

    # --- tokens -----------------------------------------------------------------------------------

    def allowed(self, user: str, type_: str, name: str) -> set[str]:
        subject = name if type_ == "repository" else f"{type_}:{name}"
        actions: set[str] = set()
        for pattern, granted in self.grants.get(user, {}).items():
            if fnmatch.fnmatchcase(subject, pattern):
                actions.update(granted)
        return actions

    def grant(self, user: str, scopes: list[str]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            try:
                type_, rest = scope.split(":", 1)
                name, wanted = rest.rsplit(":", 1)
            except ValueError:
                continue
            allowed = self.allowed(user, type_, name)
            actions = [a for a in dict.fromkeys(wanted.split(",")) if a and ("*" in allowed or a in allowed)]
            access.append({"type": type_, "name": name, "actions": actions})
        return access

    def make_token(self, user: str, access: list[dict[str, Any]], *, lifetime: int | None = None) -> str:
        now = int(time.time())
        life = self.lifetime if lifetime is None else lifetime
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + life - JWT_LEEWAY,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self.signing_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _user(self, h: BaseHTTPRequestHandler) -> str | None:
        """The authenticated user, "" for anonymous, None for wrong credentials."""
        auth = h.headers.get("Authorization")
        if not auth:
            return ""
        kind, _, value = auth.partition(" ")
        if kind.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        with self._lock:
            ok = user in self.users and secrets.compare_digest(self.users[user], password)
        return user if ok else None

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        with self._gzip_lock:  # not self._lock: an answer may be sent while it is held
            encoded, self.gzip_next = self.gzip_next > 0, max(0, self.gzip_next - 1)
        if encoded:
            data = gzip.compress(gzip.compress(data))
            headers = {**headers, "Content-Encoding": "gzip, gzip"}
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        if parts.path != "/token":
            return self._send(h, 404, {"errors": [{"code": "NOT_FOUND"}]}, {})
        query = parse_qs(parts.query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        user = self._user(h)
        with self._lock:
            fail = self.fail_next.pop(0) if self.fail_next else None
        if fail is not None:
            return self._send(h, fail, {"errors": [{"code": "INJECTED"}]}, {})
        if user is None:
            return self._send(
                h, 401, {"errors": [{"code": "UNAUTHORIZED"}]}, {"WWW-Authenticate": 'Basic realm="token"'}
            )
        with self._lock:
            access = self.grant(user, scopes)
            for scope in scopes or [""]:
                self.scope_counts[scope] += 1
            self.requests.append(TokenRequest(user, query.get("service", [None])[0], scopes, access))
            expires_in = self.lifetime if self.reported_expires_in is None else self.reported_expires_in
        token = self.make_token(user, access)
        issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {"token": token, "access_token": token, "expires_in": expires_in, "issued_at": issued_at}
        if self.padding:
            body["padding"] = " " * self.padding
        return self._send(h, 200, body, {"Cache-Control": "no-store"})

    def _handle_form(self, h: BaseHTTPRequestHandler) -> None:
        if urlsplit(h.path).path != "/token":
            return self._send(h, 404, {"errors": [{"code": "NOT_FOUND"}]}, {})
        form = {k: v[0] for k, v in parse_qs(h.rfile.read(int(h.headers.get("Content-Length", 0))).decode()).items()}
        grant_type, client_id = form.get("grant_type"), form.get("client_id")
        if grant_type != "refresh_token" or not client_id:
            return self._send(h, 400, {"error": "invalid_request"}, {})
        scopes = form.get("scope", "").split()
        with self._lock:
            user = self.refresh_tokens.get(form.get("refresh_token", ""))
            if user is None:
                return self._send(h, 401, {"error": "invalid_grant"}, {})
            access = self.grant(user, scopes)
            for scope in scopes or [""]:
                self.scope_counts[scope] += 1
            self.requests.append(TokenRequest(user, form.get("service"), scopes, access, grant_type, client_id))
            expires_in = self.lifetime if self.reported_expires_in is None else self.reported_expires_in
        token = self.make_token(user, access)
        issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {"access_token": token, "scope": " ".join(scopes), "expires_in": expires_in, "issued_at": issued_at}
        return self._send(h, 200, body, {"Cache-Control": "no-store"})


# --- the registry ---------------------------------------------------------------------------------


@dataclass
class Registry:
    """A running `docker-registry serve`; `stop()` ends it (and its token server, if any)."""

    host: str  # "127.0.0.1:PORT"
    scheme: str  # "http" | "https"
    root: Path  # storage root directory
    dir: Path  # config, log, certificates
    process: subprocess.Popen[bytes]
    log_file: Path
    config_file: Path
    ca_file: Path | None = None  # the CA that issued the server certificate (TLS only)
    cert_dir: Path | None = None  # a directory holding only ca.crt, for skopeo --*-cert-dir (TLS only)
    username: str | None = None
    password: str | None = None
    users: dict[str, str] = field(default_factory=dict)  # every htpasswd / token user -> password
    token_server: TokenServer | None = None
    _repos: Iterator[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def auth(self) -> str | None:
        """The auth set-up: "basic", "token" or None."""
        if self.token_server is not None:
            return "token"
        return "basic" if self.users else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def unique_repo(self, prefix: str = "test") -> str:
        """A repository name no other test of this session uses, e.g. "test/r3-1a2b3c"."""
        return f"{prefix}/r{next(self._repos)}-{secrets.token_hex(3)}"

    def ref(self, repo: str, tag_or_digest: str = "latest") -> str:
        """The reference `HOST/REPO:TAG`, or `HOST/REPO@sha256:...` for a digest."""
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.host}/{repo}{sep}{tag_or_digest}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def creds(self, user: str | None = None) -> tuple[str, str] | None:
        """(user, password): the given user's, or the default one's; None without auth."""
        if user is None:
            return (self.username, self.password) if self.username and self.password else None
        users = self.token_server.users if self.token_server is not None else self.users
        return user, users[user]

    def skopeo_args(self, side: str, user: str | None = None) -> list[str]:
        """skopeo flags to reach this registry; `side` is "src" or "dest" (or "" for inspect)."""
        p = f"--{side}-" if side else "--"
        args = [f"{p}cert-dir={self.cert_dir}"] if self.cert_dir else [f"{p}tls-verify=false"]
        creds = self.creds(user)
        if creds:
            args.append(f"{p}creds={creds[0]}:{creds[1]}")
        return args

    def docker_config(self, directory: Path, user: str | None = None) -> Path:
        """Write `directory/config.json` with `auths` for this registry (for DOCKER_CONFIG)."""
        directory.mkdir(parents=True, exist_ok=True)
        auths: dict[str, Any] = {}
        creds = self.creds(user)
        if creds:
            auths[self.host] = {"auth": base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()}
        path = directory / "config.json"
        path.write_text(json.dumps({"auths": auths}))
        return path

    def token(self, scopes: list[str], user: str | None = None) -> str:
        """A bearer token straight from the token server (token set-up only); does not count requests."""
        assert self.token_server is not None
        who = user if user is not None else (self.username or "")
        return self.token_server.make_token(who, self.token_server.grant(who, scopes))

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        scopes: list[str] | None = None,
        user: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to the registry with the default (or given) user's credentials.

        For the token set-up, `scopes` (default: pull on the repository named in a /v2/NAME/... path)
        decides the token. An independent check of what is stored; returns (status, headers, body).
        """
        hdrs = dict(headers or {})
        creds = self.creds(user)
        if self.token_server is not None:
            if scopes is None:
                name = path.split("?")[0].removeprefix("/v2/")
                for marker in ("/blobs/", "/manifests/", "/tags/"):
                    if marker in name:
                        scopes = [f"repository:{name.split(marker)[0]}:pull"]
                        break
            hdrs["Authorization"] = f"Bearer {self.token(scopes or [], user)}"
        elif creds:
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        conn = _connection(self.scheme, self.host, self.ssl_context(), timeout=30)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()


def _connection(scheme: str, host: str, context: ssl.SSLContext | None, timeout: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return http.client.HTTPSConnection(host, timeout=timeout, context=context)
    return http.client.HTTPConnection(host, timeout=timeout)


def _config_yaml(root: Path, port: int, extra: dict[str, Any]) -> str:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "modelcar-test-http-secret"},
    }
    for key, value in extra.items():
        config.setdefault(key, {}).update(value)
    return json.dumps(config, indent=2)  # JSON is YAML


def _htpasswd_line(user: str, password: str) -> str:
    out = subprocess.run(
        [require_tool("htpasswd"), "-Bbn", user, password], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.strip() + "\n"


def start_registry(
    tmp_dir: Path,
    *,
    tls: bool = False,
    htpasswd: Mapping[str, str] | None = None,
    token: TokenServer | None = None,
    timeout: float = 20.0,
) -> Registry:
    """Start `docker-registry serve` with its config, storage, log and certificates in `tmp_dir`.

    `htpasswd` maps user -> password (bcrypt via `htpasswd -B`); `token` is a TokenServer, started
    here if it is not yet, and stopped with the registry. The first user becomes `username`/`password`.
    """
    binary = require_tool(REGISTRY_BIN)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    root = tmp_dir / "storage"
    root.mkdir(exist_ok=True)
    extra: dict[str, Any] = {}
    ca_file = cert_dir = None
    if tls:
        ca = TestCA(tmp_dir / "tls-ca")
        _, _, cert_file, key_file = ca.issue("server", dns=("localhost",), ips=("127.0.0.1",))
        extra["http"] = {"tls": {"certificate": str(cert_file), "key": str(key_file)}}
        ca_file = ca.cert_file
        cert_dir = tmp_dir / "certs.d"
        cert_dir.mkdir(exist_ok=True)
        shutil.copy(ca_file, cert_dir / "ca.crt")
    users: dict[str, str] = {}
    if htpasswd is not None and token is not None:
        raise ValueError("htpasswd and token auth are exclusive")
    if htpasswd is not None:
        users = dict(htpasswd)
        path = tmp_dir / "htpasswd"
        path.write_text("".join(_htpasswd_line(u, p) for u, p in users.items()))
        extra["auth"] = {"htpasswd": {"realm": "modelcar-test", "path": str(path)}}
    if token is not None:
        token.start()
        users = dict(token.users)
        extra["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.rootcertbundle),
            }
        }
    # distribution reads REGISTRY_* variables as config overrides (REGISTRY_AUTH_FILE would be one).
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    log_file = tmp_dir / "registry.log"
    config_file = tmp_dir / "config.yml"
    last_error = ""
    for _attempt in range(5):
        port = free_port()
        config_file.write_text(_config_yaml(root, port, extra))
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                [binary, "serve", str(config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_dir,
            )
        user = next(iter(users), None)
        registry = Registry(
            host=f"127.0.0.1:{port}",
            scheme=scheme,
            root=root,
            dir=tmp_dir,
            process=process,
            log_file=log_file,
            config_file=config_file,
            ca_file=ca_file,
            cert_dir=cert_dir,
            username=user,
            password=users.get(user) if user else None,
            users=users,
            token_server=token,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                conn = _connection(scheme, registry.host, context, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return registry
                last_error = f"GET /v2/ answered {status}"
            except (OSError, http.client.HTTPException) as e:
                last_error = repr(e)
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
            break  # it ran but never answered: another port will not help
    if token is not None:
        token.stop()
    raise RuntimeError(f"docker-registry did not come up ({last_error}); log:\n{log_file.read_text(errors='replace')}")


# --- pytest fixtures ------------------------------------------------------------------------------

TLS_USERS = {"user": "pass", "other": "other-pass"}


@pytest.fixture(scope="session")
def _plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("registry-plain"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def _tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    require_tool(REGISTRY_BIN)
    require_tool("htpasswd")
    registry = start_registry(tmp_path_factory.mktemp("registry-tls"), tls=True, htpasswd=TLS_USERS)
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def _token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    require_tool(REGISTRY_BIN)
    d = tmp_path_factory.mktemp("registry-token")
    registry = start_registry(d, token=TokenServer(d / "token"))
    yield registry
    registry.stop()


def _alive(registry: Registry) -> Registry:
    if registry.process.poll() is not None:
        pytest.fail(f"docker-registry exited with {registry.process.returncode}; log:\n{registry.log()}")
    return registry


@pytest.fixture
def registry(_plain_registry: Registry) -> Registry:
    """Plain HTTP, no auth; shared by the session: use `registry.unique_repo()`."""
    return _alive(_plain_registry)


@pytest.fixture
def tls_registry(_tls_registry: Registry) -> Registry:
    """HTTPS (`ca_file`, `cert_dir`) with htpasswd users `user:pass` (default) and `other:other-pass`."""
    return _alive(_tls_registry)


@pytest.fixture
def token_registry(_token_registry: Registry) -> Iterator[Registry]:
    """Bearer-token auth; `token_server` is reset for each test (users alice (pull, push, delete on
    everything; the default user) and reader (pull only), lifetime 300 s, counters empty)."""
    assert _token_registry.token_server is not None
    _token_registry.token_server.reset()
    yield _alive(_token_registry)
    _token_registry.token_server.reset()


@pytest.fixture
def fault_proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the plain registry; its `url`/`host` replace the registry's."""
    proxy = FaultProxy(registry.url).start()
    yield proxy
    proxy.stop()
