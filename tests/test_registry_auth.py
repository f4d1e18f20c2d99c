"""The registry client against real registries: credentials from where docker and podman keep them,
TLS, bearer tokens per scope (and refreshed when they expire, also mid-upload), retries through an
injecting proxy, an interrupted push that resumes, concurrent pushes, and flat memory (DESIGN.md
sections 6 and 8). Models are local directories (`path:` sources): no Hub needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import yaml

from modelcar.image import LARGE_FILE, digest_of
from modelcar.retry import RetryPolicy
from modelcar.stores.registry import RegistryStore
from modelcar.stores.registry_client import AuthError, RegistryClient, RegistryError, RegistryOptions
from tests.conftest import Cli, require_tool, run_module, write_catalog
from tests.faultproxy import FaultProxy

if TYPE_CHECKING:  # tests.registry is a pytest plugin, imported before this module
    from tests.registry import Registry

MiB = 1 << 20
SMALL = {"config.json": b'{"model_type": "llama"}\n', "tokenizer.json": b'{"version": "1.0"}\n'}


@pytest.fixture(autouse=True)
def _no_user_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never the user's ~/.docker or podman auth files: an empty DOCKER_CONFIG, XDG_RUNTIME_DIR and
    XDG_CONFIG_HOME (without it, /run/containers/UID) unless a test writes one."""
    empty = tmp_path / "no-docker-config"
    empty.mkdir()
    for name in ("DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(name, str(empty))
    for name in ("REGISTRY_AUTH_FILE", "MODELCAR_INSECURE_REGISTRIES"):
        monkeypatch.delenv(name, raising=False)
    return empty


def _big(size: int, seed: int) -> bytes:
    """`size` bytes that differ per seed (so layers differ), cheap to make."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    return (block * (size // MiB + 1))[:size]


def _catalog(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A catalog with one model, `tiny`, from the local directory `m` holding `files`."""
    for path, data in files.items():
        (tmp_path / "m" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "m" / path).write_bytes(data)
    return write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    path: ./m\n")


def _locked(cat: Path, model: str = "tiny") -> dict:  # type: ignore[type-arg]
    return dict(yaml.safe_load(cat.with_suffix(".lock").read_text())["models"][model])


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _skopeo_raw(registry: Registry, repo: str, digest: str, user: str | None = None) -> bytes:
    skopeo = require_tool("skopeo")
    out = subprocess.run(
        [skopeo, "inspect", "--raw", *registry.skopeo_args("", user), f"docker://{registry.ref(repo, digest)}"],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def _layers(registry: Registry, repo: str, index: bytes) -> list[dict]:  # type: ignore[type-arg]
    """The layer descriptors of an image's first manifest, read straight from the registry."""
    child = json.loads(index)["manifests"][0]["digest"]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    status, _, body = registry.request("GET", f"/v2/{repo}/manifests/{child}", headers=accept)
    assert status == 200 and _sha(body) == child
    return list(json.loads(body)["layers"])


def _auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, user: str, secret: str) -> Path:
    """A real `docker-credential-mctest` on PATH that knows one host; returns the file it logs calls to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "helper-calls.log"
    script = bindir / "docker-credential-mctest"
    script.write_text(
        "#!/bin/sh\n"
        "read -r server\n"
        f'echo "$1 $server" >> "{calls}"\n'
        f'if [ "$1" = get ] && [ "$server" = "{host}" ]; then\n'
        f'  printf \'{{"ServerURL": "%s", "Username": "{user}", "Secret": "{secret}"}}\\n\' "$server"\n'
        "  exit 0\n"
        "fi\n"
        "echo 'credentials not found in native keychain'\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{stderr}"
    return lines[0]


# --- 1. credentials from docker config, podman auth file, credential helpers; TLS with --ca-file ----


@pytest.mark.parametrize(
    "source",
    ["docker-auths", "podman-auth-file", "podman-runtime-dir", "podman-config-home", "cred-helper", "creds-store"],
)
def test_push_over_tls_with_credentials_from(
    source: str, cli: Cli, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = tls_registry
    user, password = "other", r.users["other"]  # not the default user; a password that stands out
    config = tmp_path / "docker"
    calls = None
    if source == "docker-auths":
        r.docker_config(config, user=user)
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
    elif source.startswith("podman-"):  # `podman login` writes the runtime dir's file; the others are read too
        auth_file = _write_json(tmp_path / "containers" / "auth.json", {"auths": {r.host: _auth_entry(user, password)}})
        variable = {
            "auth-file": "REGISTRY_AUTH_FILE",
            "runtime-dir": "XDG_RUNTIME_DIR",
            "config-home": "XDG_CONFIG_HOME",
        }
        where = source.removeprefix("podman-")
        monkeypatch.setenv(variable[where], str(auth_file if where == "auth-file" else tmp_path))
    else:
        calls = _credential_helper(tmp_path, monkeypatch, r.host, user, password)
        doc = (
            {"credHelpers": {r.host: "mctest"}}
            if source == "cred-helper"
            else {"credsStore": "mctest", "auths": {r.host: {}}}  # `auths` as `docker login` leaves it
        )
        _write_json(config / "config.json", doc)
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
    # Two layers uploaded at once: concurrent first requests must not mistake each other's 401s.
    cat = _catalog(tmp_path, {**SMALL, "model.safetensors": _big(LARGE_FILE, 1)})
    prefix = r.unique_repo()

    assert r.ca_file is not None
    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}", "--ca-file", r.ca_file)
    locked = _locked(cat)["image"]
    assert locked["repository"] == f"{r.host}/{prefix}/tiny"
    assert locked["digest"] in result.stdout and "2 layers" in result.stdout
    assert _sha(_skopeo_raw(r, f"{prefix}/tiny", locked["digest"], user=user)) == locked["digest"]
    assert password not in result.stdout + result.stderr + cat.with_suffix(".lock").read_text()
    if calls is not None:  # the helper was asked, once, for this registry
        assert calls.read_text().splitlines() == [f"get {r.host}"]


def test_reading_many_models_from_where_the_lock_says_asks_for_credentials_once(
    cli: Cli, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = tls_registry
    calls = _credential_helper(tmp_path, monkeypatch, r.host, "other", r.users["other"])
    _write_json(tmp_path / "docker" / "config.json", {"credHelpers": {r.host: "mctest"}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"name": "{name}"}}')
    models = "".join(f"  - name: {n}\n    path: ./{n}\n" for n in "abc")
    cat = write_catalog(tmp_path / "catalog.yaml", f"registry: {r.host}/{r.unique_repo()}\nmodels:\n{models}")
    assert r.ca_file is not None
    cli("build", "-c", cat, "--push", "--ca-file", r.ca_file)
    calls.write_text("")
    result = cli("verify", "-c", cat, "--ca-file", r.ca_file)  # no layout: each image from the registry
    assert result.stdout == "a  ok\nb  ok\nc  ok\n"
    assert calls.read_text().splitlines() == [f"get {r.host}"]  # one client for the three


# --- 2. clear one-line errors, no secret in them -------------------------------------------------


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_wrong_password_is_one_clear_line_without_the_password(
    kind: str,
    cli: Cli,
    tls_registry: Registry,
    token_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = tls_registry if kind == "htpasswd" else token_registry
    wrong = "Wr0ng-s3cret-9f8e7d"
    _write_json(tmp_path / "docker" / "config.json", {"auths": {r.host: _auth_entry(r.username or "", wrong)}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    cat = _catalog(tmp_path, SMALL)
    ca = ["--ca-file", str(r.ca_file)] if r.ca_file else []

    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{r.unique_repo()}", *ca, code=1)
    line = _one_line_error(result.stderr)
    assert r.host in line and "authentication failed" in line and f"user {r.username!r}" in line
    assert "check the password" in line and f"docker login {r.host}" in line
    assert wrong not in result.stdout + result.stderr
    assert "retry" not in result.stderr  # a refused password is not worth retrying
    assert "image" not in _locked(cat)  # nothing recorded
    verbose = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{r.unique_repo()}", *ca, "-v", code=1)
    assert "authentication failed" in verbose.stderr and wrong not in verbose.stdout + verbose.stderr


def test_a_service_pushes_for_two_tenants_at_once_each_with_its_own_credentials(
    tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build service in one process: each Remote names the auth file of its tenant, the only one
    read (the process's environment has none), so two pushes in threads do not see each other's."""
    import threading

    from modelcar import api
    from modelcar.build import BuildFailed
    from modelcar.errors import ModelcarError
    from modelcar.stores.registry_client import AuthError

    r = tls_registry
    assert r.ca_file is not None
    good = r.docker_config(tmp_path / "tenant-a", user="other")
    wrong = _write_json(tmp_path / "tenant-b" / "auth.json", {"auths": {r.host: _auth_entry("other", "Wr0ng-pw")}})
    outcome: dict[str, object] = {}

    def push(tenant: str, auth_file: Path) -> None:
        (tmp_path / tenant).mkdir(exist_ok=True)
        cat = _catalog(tmp_path / tenant, SMALL)
        remote = api.Remote(ca_file=r.ca_file, registry_auth_file=auth_file, retry=api.RetryPolicy(max_retries=0))
        try:
            outcome[tenant] = api.build(cat, push=True, registry=f"{r.host}/{tenant}", remote=remote)[0].digest
        except BuildFailed as exc:
            outcome[tenant] = exc.errors["tiny"]
        except AuthError as exc:  # refused before the build (asked for the earlier image the lock records)
            outcome[tenant] = exc

    threads = [threading.Thread(target=push, args=a) for a in (("tenant-a", good), ("tenant-b", wrong))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert str(outcome["tenant-a"]).startswith("sha256:")
    refused = outcome["tenant-b"]
    assert isinstance(refused, AuthError) and f"put this registry's credentials in {wrong}" in str(refused)
    assert "Wr0ng-pw" not in str(refused) and r.users["other"] not in str(refused)
    # the tenant's file is the only one read: the process's own credentials are not tried after it
    r.docker_config(tmp_path / "process-docker", user="other")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "process-docker"))
    push("tenant-c", _write_json(tmp_path / "tenant-c" / "auth.json", {"auths": {}}))
    refused = outcome["tenant-c"]
    assert isinstance(refused, AuthError) and "authentication required: put this registry's credentials" in str(refused)
    # nor does a credential helper it names run (it would answer with this machine's credentials)
    calls = _credential_helper(tmp_path, monkeypatch, r.host, "other", r.users["other"])
    push("tenant-d", _write_json(tmp_path / "tenant-d" / "auth.json", {"credsStore": "mctest", "auths": {r.host: {}}}))
    assert isinstance(outcome["tenant-d"], AuthError) and not calls.exists()
    missing = api.Remote(ca_file=r.ca_file, registry_auth_file=tmp_path / "nowhere.json")
    with pytest.raises(ModelcarError, match=r"nowhere\.json: registry auth file not found"):
        api.build(_catalog(tmp_path, SMALL), push=True, registry=f"{r.host}/c", remote=missing)


def test_unknown_ca_names_ca_file(
    cli: Cli, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = tls_registry
    r.docker_config(tmp_path / "docker", user="other")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    cat = _catalog(tmp_path, SMALL)

    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{r.unique_repo()}", code=1)
    line = _one_line_error(result.stderr)  # one line: no "retry 1/8 in ..." before it, failed at once
    assert r.host in line and "TLS failure" in line and "certificate verify failed" in line
    assert "--ca-file" in line
    assert r.users["other"] not in result.stdout + result.stderr


def test_system_cas_are_trusted_without_ca_file(
    cli: Cli, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system CA store (here: OpenSSL's SSL_CERT_FILE naming the registry's CA) is loaded at the
    first TLS handshake, not at start-up, and it is what verifies the registry."""
    r = tls_registry
    assert r.ca_file is not None
    r.docker_config(tmp_path / "docker", user="other")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("SSL_CERT_FILE", str(r.ca_file))
    cat = _catalog(tmp_path, SMALL)
    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{r.unique_repo()}", "--json")
    assert json.loads(result.stdout)["models"][0]["digest"].startswith("sha256:")


def test_missing_push_permission(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = token_registry
    assert r.token_server is not None
    r.docker_config(tmp_path / "docker", user="reader")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    cat = _catalog(tmp_path, SMALL)
    prefix = r.unique_repo()

    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}", code=1)
    line = _one_line_error(result.stderr)
    assert r.host in line and "user 'reader'" in line
    assert f"repository:{prefix}/tiny:pull,push" in line and "ask the registry's admin" in line
    assert r.users["reader"] not in result.stdout + result.stderr
    # It asked as reader and was granted pull only; nothing landed.
    assert {req.user for req in r.token_server.requests} == {"reader"}
    assert all(g["actions"] == ["pull"] for req in r.token_server.requests for g in req.granted)
    status, _, _ = r.request("GET", f"/v2/{prefix}/tiny/tags/list")
    assert status == 404


def test_a_mount_from_a_repository_the_user_may_not_read_falls_back_to_an_upload(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI robot that may push to team-b only, pushing what team-a pushed first: the lock names
    team-a's repository, so each blob is asked to be mounted from there; the token comes without
    that scope and the mount is refused. A mount is a shortcut: the blobs go up instead."""
    r = token_registry
    assert r.token_server is not None
    run = r.unique_repo("mnt")
    r.token_server.users["robot"] = "robot-pass"
    r.token_server.grants["robot"] = {f"{run}/team-b/*": ["pull", "push"]}
    cat = _catalog(tmp_path, SMALL | {"model.safetensors": _big(3 * MiB, 7)})
    cli("build", "-c", cat)
    r.docker_config(tmp_path / "alice", user="alice")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "alice"))
    cli("push", "-c", cat, "--registry", f"{r.host}/{run}/team-a")
    digest = _locked(cat)["image"]["digest"]

    r.docker_config(tmp_path / "robot", user="robot")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "robot"))
    r.token_server.requests.clear()
    result = cli("push", "-c", cat, "--registry", f"{r.host}/{run}/team-b", "--jobs", "1")
    assert result.stdout.split()[:2] == ["tiny", digest] and result.stdout.rstrip().endswith(f"{run}/team-b/tiny")
    asked = [req for req in r.token_server.requests if f"repository:{run}/team-a/tiny:pull" in req.scopes]
    # one mount asked (a token for it, and a fresh one when it is refused), not one per blob (4)
    assert len(asked) == 2
    assert all(not g["actions"] for req in asked for g in req.granted if f"{run}/team-a" in g["name"])
    assert _skopeo_raw(r, f"{run}/team-b/tiny", digest, user="robot")
    cli("verify", "-c", cat, "--from", f"{r.host}/{run}/team-b")


def test_credentials_go_to_the_registry_only_not_where_an_upload_location_points(
    cli: Cli, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = tls_registry
    user, password = "other", r.users["other"]
    with FaultProxy(r.url, ssl_context=r.ssl_context()) as proxy:
        # the upload sessions' Location names the same server by another name: another origin
        proxy.location = f"http://localhost:{proxy.host.rsplit(':', 1)[1]}"
        _write_json(tmp_path / "docker" / "config.json", {"auths": {proxy.host: _auth_entry(user, password)}})
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        cat = _catalog(tmp_path, SMALL)
        result = cli("build", "-c", cat, "--push", "--registry", f"{proxy.host}/{r.unique_repo()}", code=1)
    line = _one_line_error(result.stderr)
    assert f"sent the request to http://localhost:{proxy.host.rsplit(':', 1)[1]}, which asks for credentials" in line
    assert password not in result.stdout + result.stderr
    elsewhere = [e for e in proxy.exchanges if e.host.startswith("localhost:")]
    assert elsewhere and all(e.authorization is None for e in elsewhere)
    assert any(e.authorization for e in proxy.exchanges if e.host == proxy.host)  # the registry itself got them


# --- 3. bearer tokens: one per scope, refreshed on 401, also mid-upload ----------------------------


def test_token_per_scope_fetched_once_with_parallel_uploads(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = token_registry
    ts = r.token_server
    assert ts is not None
    r.docker_config(tmp_path / "docker")  # alice
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    files = {**SMALL, **{f"model-{i}.safetensors": _big(LARGE_FILE, 10 + i) for i in range(3)}}
    cat = _catalog(tmp_path, files)
    prefix = r.unique_repo()
    push_scope, pull_scope = f"repository:{prefix}/tiny:pull,push", f"repository:{prefix}/tiny:pull"

    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}", "--jobs", "4")
    assert "4 layers" in result.stdout
    # Four uploads start at once, each first answered 401: one token fetch serves them all.
    assert [req.scopes for req in ts.requests] == [[push_scope]], ts.requests
    assert {req.user for req in ts.requests} == {"alice"}

    # A reader of the same repository asks for its own, pull-only scope.
    verified = cli("verify", "-c", cat, "--from", f"{r.host}/{prefix}")
    assert "tiny  ok" in verified.stdout
    assert ts.scope_counts[push_scope] == 1 and ts.scope_counts[pull_scope] == 1
    assert len(ts.requests) == 2
    digest = _locked(cat)["image"]["digest"]
    assert _sha(_skopeo_raw(r, f"{prefix}/tiny", digest, user="alice")) == digest
    assert r.users["alice"] not in result.stdout + result.stderr


def test_verbose_shows_each_registry_request_and_no_secret(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-v is what a platform engineer reads when a push misbehaves: each request, its answer, where
    a token came from; never the password, a token, or an upload's state."""
    r = token_registry
    assert r.token_server is not None
    r.docker_config(tmp_path / "docker")  # alice
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    cat = _catalog(tmp_path, SMALL)
    prefix = r.unique_repo()
    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}", "-v")
    lines = result.stderr.splitlines()
    repo = f"http://{r.host}/v2/{prefix}/tiny"
    token = f"{r.host}: token for repository:{prefix}/tiny:pull,push from {r.token_server.url}/token: HTTP 200"
    assert f"modelcar: {token}" in lines
    posts = [line.rsplit(": ", 1)[1] for line in lines if line.startswith(f"modelcar: POST {repo}/blobs/uploads/:")]
    assert posts.count("HTTP 202") == 3 and set(posts) == {"HTTP 401", "HTTP 202"}  # 3 blobs; 401 until the token came
    assert lines.index(f"modelcar: {token}") < lines.index(f"modelcar: POST {repo}/blobs/uploads/: HTTP 202")
    put = [line for line in lines if line.startswith(f"modelcar: PUT {repo}/")]
    assert sum(f"{repo}/blobs/uploads/" in line and line.endswith(": HTTP 201") for line in put) == 3  # no query
    tag = result.stderr.split("(tags: ")[1].split(")")[0]
    assert put[-1] == f"modelcar: PUT {repo}/manifests/{tag}: HTTP 201"
    assert r.users["alice"] not in result.stdout + result.stderr
    assert "Bearer" not in result.stderr and "_state" not in result.stderr
    quiet = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}", "--update")
    assert f"{repo}/" not in quiet.stderr  # only with -v


def test_a_busy_token_service_is_retried(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = token_registry
    assert r.token_server is not None
    r.docker_config(tmp_path / "docker")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    r.token_server.fail_next[:] = [503, 429]
    cat = _catalog(tmp_path, SMALL)
    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{r.unique_repo()}")
    assert "1 layer " in result.stdout and r.token_server.fail_next == []
    assert "retry" in result.stderr


def test_an_encoded_token_answer_is_refused_not_decoded(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token service's answer is asked for as it is too: 1.4 KB of nested gzip from a realm took
    1.6 GB of memory before the answer's cap."""
    r = token_registry
    assert r.token_server is not None
    r.docker_config(tmp_path / "docker")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    r.token_server.gzip_next = 1
    cat = _catalog(tmp_path, SMALL)
    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{r.unique_repo()}", "--json", code=1)
    error = json.loads(result.stdout)["models"][0]["error"]
    assert "the answer came with Content-Encoding: gzip, gzip, where none was asked for" in error, error


def test_identity_token_is_exchanged_with_an_oauth2_refresh_grant(
    cli: Cli, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = token_registry
    ts = r.token_server
    assert ts is not None
    cat = _catalog(tmp_path, SMALL)
    prefix = r.unique_repo()
    _write_json(tmp_path / "docker" / "config.json", {"auths": {r.host: {"identitytoken": "alice-refresh-token"}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))

    cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}")
    assert ts.requests, "no token was asked for"
    assert {(q.user, q.grant_type, q.client_id) for q in ts.requests} == {("alice", "refresh_token", "modelcar")}
    assert f"repository:{prefix}/tiny:pull,push" in {s for q in ts.requests for s in q.scopes}
    assert _locked(cat)["image"]["digest"].startswith("sha256:")

    # a token the service does not know: one line naming where it came from, the token itself not printed
    _write_json(tmp_path / "docker" / "config.json", {"auths": {r.host: {"identitytoken": "revoked-token"}}})
    (tmp_path / "m" / "config.json").write_bytes(b'{"model_type": "llama", "changed": true}\n')
    result = cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{prefix}", code=1)
    line = _one_line_error(result.stderr)
    assert "authentication failed for the identity token from" in line and r.host in line
    assert "revoked-token" not in result.stdout + result.stderr


def _token_store(r: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> RegistryStore:
    """A library-level store for the token registry reached at `host`, alice's credentials via DOCKER_CONFIG."""
    _write_json(tmp_path / "docker" / "config.json", {"auths": {host: _auth_entry("alice", r.users["alice"])}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return RegistryStore(f"{host}/{r.unique_repo()}", RegistryOptions.create(), write=True)


LIFETIME = 2  # seconds the registry accepts a token (TokenServer.lifetime)


def _blob_present(r: Registry, repo: str, digest: str) -> bool:
    status, _, _ = r.request("HEAD", f"/v2/{repo}/blobs/{digest}")
    return status == 200


def test_expired_token_is_refreshed(token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = token_registry
    ts = r.token_server
    assert ts is not None
    ts.lifetime = LIFETIME
    store = _token_store(r, tmp_path, monkeypatch, r.host)
    repo = store.image_name("tiny")
    scope = f"repository:{repo}:pull,push"
    first, second = os.urandom(1000), os.urandom(1000)
    try:
        assert store.put_blob(repo, len(first), lambda: [first], _sha(first)) == _sha(first)
        assert ts.scope_counts[scope] == 1
        time.sleep(LIFETIME + 1.2)  # the cached token is now refused
        assert store.put_blob(repo, len(second), lambda: [second], _sha(second)) == _sha(second)
    finally:
        store.close()
    assert ts.scope_counts[scope] == 2  # refreshed once, on the 401
    assert _blob_present(r, repo, _sha(first)) and _blob_present(r, repo, _sha(second))


@pytest.mark.parametrize("how", ["slow-source-put", "slow-source-patch", "held-patch"])
def test_token_expiring_mid_upload_is_refreshed_in_the_same_session(
    how: str, token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slow-source-*: the blob's first open takes longer than a token lives (a slow disk, a long layer),
    so the upload's next request carries an expired token: the monolithic PUT (digest known), or the
    finishing PUT after the PATCH (digest computed on the way). held-patch: the PATCH reaches the
    registry only after the token expired, is refused, and is sent again with the stream reopened."""
    r = token_registry
    ts = r.token_server
    assert ts is not None
    ts.lifetime = LIFETIME
    data = os.urandom(300_000)
    opened: list[float] = []

    def source() -> list[bytes]:
        opened.append(time.monotonic())
        if len(opened) == 1 and how.startswith("slow-source"):
            time.sleep(LIFETIME + 1.2)
        return [data]

    with FaultProxy(r.url) as proxy:  # watches the requests; holds the PATCH for held-patch
        if how == "held-patch":
            proxy.stall("PATCH", r"/blobs/uploads/", seconds=LIFETIME + 1.2)
        store = _token_store(r, tmp_path, monkeypatch, proxy.host)
        repo = store.image_name("tiny")
        try:
            got = store.put_blob(repo, len(data), source, _sha(data) if how == "slow-source-put" else None)
        finally:
            store.close()
        uploads = [(e.method, e.status) for e in proxy.exchanges if "/blobs/uploads/" in e.path]

    assert got == _sha(data) and _blob_present(r, repo, got)
    assert ts.scope_counts[f"repository:{repo}:pull,push"] == 2  # refreshed once
    # One upload session (a single successful POST); the refused request was sent again.
    expected = {
        "slow-source-put": [("POST", 202), ("PUT", 401), ("PUT", 201)],  # after a HEAD that got the token
        "slow-source-patch": [("POST", 401), ("POST", 202), ("PATCH", 202), ("PUT", 401), ("PUT", 201)],
        "held-patch": [("POST", 401), ("POST", 202), ("PATCH", 401), ("PATCH", 202), ("PUT", 201)],
    }
    assert uploads == expected[how]
    assert len(opened) == (1 if how == "slow-source-patch" else 2)  # reopened when its bytes were sent


# --- 4. retries through a fault-injecting proxy -------------------------------------------------


@pytest.mark.parametrize("chunk", [0, MiB], ids=["one-request", "chunked"])
def test_push_survives_429_503_and_dropped_connections(
    chunk: int, cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy = fault_proxy
    size = LARGE_FILE + MiB // 2
    cat = _catalog(tmp_path, {"model.safetensors": _big(size, 2)})  # one multi-MiB layer
    prefix = registry.unique_repo()
    uploads = r"/blobs/uploads/"
    # The layer's upload: the connection drops mid-body, then a 503, then 429 when it starts again.
    dropped = proxy.drop("PATCH", uploads, after_bytes=5 * MiB if chunk == 0 else MiB // 2, skip=0 if chunk == 0 else 4)
    proxy.fail_503("PATCH", uploads)
    limited = proxy.fail_429("POST", uploads + "$", retry_after=1, skip=2)
    # The first config's monolithic PUT (the layer's finishing PUT goes through).
    proxy.fail_503("PUT", uploads + ".*digest=sha256:", skip=1)

    result = cli(
        "build", "-c", cat, "--push", "--registry", f"{proxy.host}/{prefix}", "--jobs", "1",
        "--upload-chunk-size", str(chunk),
    )  # fmt: skip
    assert proxy.pending() == [], "every fault was hit"
    digest = _locked(cat)["image"]["digest"]
    index = _skopeo_raw(registry, f"{prefix}/tiny", digest)
    assert _sha(index) == digest
    (layer,) = _layers(registry, f"{prefix}/tiny", index)
    verified = cli("verify", "-c", cat, "--from", f"{registry.host}/{prefix}")
    assert "tiny  ok" in verified.stdout

    ex = proxy.exchanges
    drop = next(e for e in ex if e.fault == "drop")
    assert 0 < drop.request_bytes < size  # cut mid-layer
    i = ex.index(next(e for e in ex if e.fault == "status" and e.status == 429))
    after = next(e for e in ex[i + 1 :] if e.method == "POST")
    assert after.time - ex[i].time >= 0.95, "Retry-After: 1 honoured"
    assert limited.hits == 1 and dropped.hits == 1
    patches = [e for e in ex if e.method == "PATCH" and e.fault is None]
    if chunk:
        assert all(e.request_bytes <= chunk for e in patches) and len(patches) >= size // chunk
    else:
        assert [e.request_bytes for e in patches] == [layer["size"]]  # the whole layer in one request
    assert "retry" in result.stderr


# --- 5. an interrupted push resumes without re-uploading what was complete ----------------------


def _upload_requests(proxy: FaultProxy) -> list[tuple[str, str, int]]:
    return [
        (e.method, e.path, e.request_bytes)
        for e in proxy.exchanges
        if e.method in ("PATCH", "PUT") and "/blobs/uploads/" in e.path
    ]


def test_killed_push_resumes_without_reuploading_complete_layers(
    registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy = fault_proxy
    size = 20 * MiB
    cat = _catalog(tmp_path, {"a.safetensors": _big(size, 3), "b.safetensors": _big(size, 4)})
    prefix = registry.unique_repo()
    args = [sys.executable, "-m", "modelcar", "build", "-c", str(cat), "--push", "--jobs", "1"]
    args += ["--registry", f"{proxy.host}/{prefix}"]
    proxy.stall("PATCH", r"/blobs/uploads/", seconds=120, skip=1)  # layer b's upload hangs

    with (tmp_path / "run1.log").open("w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while not proxy.stalled():
                assert proc.poll() is None, (tmp_path / "run1.log").read_text()
                assert time.monotonic() < deadline, "the second layer's upload never started"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = _upload_requests(proxy)
    (a_finish,) = [p for m, p, _ in first if m == "PUT"]  # layer a completed, and only it
    a_digest = a_finish.rsplit("digest=", 1)[1]
    assert "image" not in _locked(cat)

    proxy.clear()
    second = run_module(*args[3:], env={"MODELCAR_CACHE": os.environ["MODELCAR_CACHE"]})
    assert second.returncode == 0, second.stderr
    again = _upload_requests(proxy)
    digest = _locked(cat)["image"]["digest"]
    assert digest in second.stdout
    index = _skopeo_raw(registry, f"{prefix}/tiny", digest)
    assert _sha(index) == digest
    a, b = _layers(registry, f"{prefix}/tiny", index)
    assert a["digest"] == a_digest
    assert proxy.count("HEAD", f"/blobs/{a_digest}$") == 1  # known from the layer cache: asked, not sent
    assert not any(a_digest in path for _, path, _ in again)
    assert [n for m, _, n in again if m == "PATCH"] == [b["size"]]  # layer b, once
    assert sum(n for _, _, n in again) < b["size"] + 64 * 1024  # plus two small configs, nothing else


def test_sigterm_during_an_upload_ends_the_run_without_waiting_for_it(
    registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """CI cancels a job with SIGTERM: the run stops (exit 143) instead of finishing a hung upload."""
    cat = _catalog(tmp_path, {"a.safetensors": _big(LARGE_FILE + MiB, 6)})
    args = [sys.executable, "-m", "modelcar", "build", "-c", str(cat), "--push"]
    args += ["--registry", f"{fault_proxy.host}/{registry.unique_repo()}"]
    fault_proxy.stall("PATCH", r"/blobs/uploads/", seconds=300)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not fault_proxy.stalled():
            assert proc.poll() is None and time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)  # well before the stalled upload would end
    finally:
        proc.kill()
        fault_proxy.release()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert "image" not in _locked(cat)


# --- 6. two pushes of the same model at once ----------------------------------------------------


def test_two_concurrent_pushes_agree(registry: Registry, tmp_path: Path) -> None:
    cat = _catalog(tmp_path, {**SMALL, "model.safetensors": _big(LARGE_FILE + 3, 5)})
    prefix = registry.unique_repo()
    args = [sys.executable, "-m", "modelcar", "build", "-c", str(cat), "--push", "--json"]
    args += ["--registry", f"{registry.host}/{prefix}"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    digests = {json.loads(out)["models"][0]["digest"] for out, _ in outputs}
    (digest,) = digests
    repository = f"{registry.host}/{prefix}/tiny"
    assert _locked(cat)["image"] == {"digest": digest, "repository": repository, "base": "scratch", "tags": []}
    assert _sha(_skopeo_raw(registry, f"{prefix}/tiny", digest)) == digest


# --- 7. memory stays flat ------------------------------------------------------------------------

# Runs `python ARGS...` as its child and reports the child's exit code and peak RSS (os.wait4). The test
# cannot be the parent: Linux carries the parent's RSS high-water mark over vfork+exec into the child's
# ru_maxrss (a pytest process that once held 300 MiB makes every child "peak" at 300 MiB).
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


@pytest.mark.parametrize("chunk", [0, 4 * MiB], ids=["one-request", "chunked-4MiB"])
def test_push_memory_stays_flat(chunk: int, registry: Registry, tmp_path: Path) -> None:
    size = 320 * MiB
    model = tmp_path / "m"
    model.mkdir()
    block = os.urandom(4 * MiB)
    with (model / "model.safetensors").open("wb") as f:
        for i in range(size // len(block)):
            f.write(block[:-8] + i.to_bytes(8, "big"))
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    path: ./m\n")
    prefix = registry.unique_repo()
    report = tmp_path / "rusage"
    args: list[str | Path] = [sys.executable, "-c", LAUNCHER, report, "-m", "modelcar", "build", "-c", cat]
    args += ["--push", "--registry", f"{registry.host}/{prefix}", "--upload-chunk-size", str(chunk)]
    with (tmp_path / "build.log").open("w") as log:
        subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=300)
    code, maxrss = map(int, report.read_text().split())
    assert code == 0, (tmp_path / "build.log").read_text()
    peak = maxrss * 1024  # ru_maxrss is in KiB on Linux
    message = f"push of a {size // MiB} MiB layer (chunk {chunk}): peak RSS {peak / MiB:.0f} MiB"
    print(message)
    assert peak < size / 3, message
    digest = _locked(cat)["image"]["digest"]
    assert _sha(_skopeo_raw(registry, f"{prefix}/tiny", digest)) == digest


# --- 8. which hosts speak plain HTTP ---------------------------------------------------------------


def test_plain_http_only_for_loopback_and_named_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    options = RegistryOptions.create()
    assert options.scheme("registry.example.com") == "https"
    assert options.scheme("registry.example.com:5000") == "https"
    assert options.scheme("10.0.0.5:5000") == "https"
    assert options.scheme("localhost.example.com") == "https"
    for host in ("localhost:5000", "localhost", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"):
        assert options.scheme(host) == "http", host

    named = RegistryOptions.create(insecure=["registry.example.com:5000"])  # --insecure-registry
    assert named.scheme("registry.example.com:5000") == "http"
    assert named.scheme("registry.example.com") == "https"
    monkeypatch.setenv("MODELCAR_INSECURE_REGISTRIES", "mirror.internal, registry.example.com:5000")
    from_env = RegistryOptions.create()
    assert from_env.scheme("mirror.internal") == "http" and from_env.scheme("registry.example.com:5000") == "http"
    assert from_env.scheme("other.internal") == "https"

    def no_request(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected request to {request.url}")

    # Only loopback hosts are probed for TLS; these get their scheme without any request.
    for host, opts, base in (
        ("registry.example.com", options, "https://registry.example.com"),
        ("mirror.internal", from_env, "http://mirror.internal"),
    ):
        client = RegistryClient(host, opts)
        client.http.close()
        client.http = httpx.Client(transport=httpx.MockTransport(no_request))
        assert client.base == base
        assert client.url("/v2/x/blobs/uploads/") == f"{base}/v2/x/blobs/uploads/"
        client.http.close()


def test_docker_hub_credentials_and_api_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker login` stores Docker Hub under https://index.docker.io/v1/; images say docker.io."""
    import base64

    from modelcar.auth import find_credentials
    from modelcar.stores.registry_client import RegistryClient, RegistryOptions

    config = tmp_path / "docker"
    config.mkdir()
    auth = base64.b64encode(b"hubuser:hub-secret").decode()
    (config / "config.json").write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        creds = find_credentials(name)
        assert creds is not None and (creds.username, creds.password) == ("hubuser", "hub-secret")
        assert "hub-secret" not in repr(creds)
    assert RegistryClient("docker.io", RegistryOptions.create()).base == "https://registry-1.docker.io"


@pytest.mark.parametrize("decoded", [b"TopSecretNoColon", b"\xff\xfe"], ids=["no-colon", "not-utf8"])
def test_an_auth_entry_that_is_not_user_colon_password_is_refused_unshown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decoded: bytes
) -> None:
    import base64

    from modelcar.auth import find_credentials
    from modelcar.errors import ModelcarError

    auth_file = _write_json(
        tmp_path / "auth.json", {"auths": {"reg.example": {"auth": base64.b64encode(decoded).decode()}}}
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    with pytest.raises(ModelcarError) as info:
        find_credentials("reg.example")
    assert str(info.value) == f"{auth_file}: the 'auth' entry is not base64 of user:password"


def test_the_most_specific_auth_entry_wins(
    cli: Cli, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """podman and skopeo keep `auths` per namespace: `HOST/team` wins over `HOST` under team/."""
    r = tls_registry
    team = r.unique_repo("team")
    auths = {
        f"{r.host}/{team}": _auth_entry("other", r.users["other"]),
        f"https://{r.host}": _auth_entry("other", "wrong-password"),  # last: the one a host-only lookup kept
    }
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(_write_json(tmp_path / "auth.json", {"auths": auths})))
    from modelcar.auth import find_credentials

    chosen = find_credentials(r.host, f"{team}/models")
    assert chosen is not None and chosen.password == r.users["other"]
    for hub_key in ("index.docker.io/v1/", "https://index.docker.io/v1/", "docker.io"):  # docker's spellings of the Hub
        _write_json(tmp_path / "hub.json", {"auths": {hub_key: _auth_entry("hubby", "pw")}})
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "hub.json"))
        found = find_credentials("docker.io", "library/busybox")
        assert found is not None and found.username == "hubby", hub_key
    for url_key in ("https://reg.example/v2/", "http://reg.example/v1/", "reg.example"):
        _write_json(tmp_path / "url.json", {"auths": {url_key: _auth_entry("bob", "pw")}})
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "url.json"))
        found = find_credentials("reg.example", "team/models")
        assert found is not None and found.username == "bob", url_key
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    wrong = find_credentials(r.host, "elsewhere")
    assert wrong is not None and wrong.password == "wrong-password"
    cat = _catalog(tmp_path, SMALL)
    assert r.ca_file is not None
    cli("build", "-c", cat, "--push", "--registry", f"{r.host}/{team}/models", "--ca-file", r.ca_file)
    assert "tiny  ok" in cli("verify", "-c", cat, "--ca-file", r.ca_file).stdout  # read where the lock says, as team
    # an image named by HOST/REPO (inspect's argument, a base) is read with its namespace's entry too
    digest = _locked(cat)["image"]["digest"]
    assert digest in cli("inspect", f"{r.host}/{team}/models/tiny@{digest}", "--ca-file", r.ca_file).stdout


@pytest.mark.parametrize("chunk", [0, MiB])
def test_an_upload_answered_201_instead_of_202_goes_on(
    chunk: int, cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """ECR answers a PATCH with 201 Created (DESIGN.md section 8); the spec says 202."""
    cat = _catalog(tmp_path, {"model.safetensors": _big(LARGE_FILE + 3 * MiB, 5)})
    prefix = registry.unique_repo()
    created = fault_proxy.restatus("PATCH", r"/blobs/uploads/", 201, times=1 << 10)
    args = [
        "build",
        "-c",
        cat,
        "--push",
        "--registry",
        f"{fault_proxy.host}/{prefix}",
        "--upload-chunk-size",
        str(chunk),
    ]
    cli(*args)
    assert created.hits >= (1 if chunk == 0 else 4)
    assert "tiny  ok" in cli("verify", "-c", cat, "--from", f"{registry.host}/{prefix}").stdout


def test_no_home_directory_reads_the_auth_file_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random UID with neither HOME nor a passwd entry: no ~/.docker to look in, and no
    traceback for it; REGISTRY_AUTH_FILE is read."""
    from modelcar import auth

    for name in ("HOME", "DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it gives without a home
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    podman = Path("/run/containers") / str(os.getuid()) / "auth.json"  # podman's file without XDG_RUNTIME_DIR
    assert auth._config_files() == [tmp_path / "auth.json", podman]


def test_a_reader_that_goes_away_ends_the_run_quietly(cli: Cli, tmp_path: Path) -> None:
    """`modelcar inspect ... | head -1`: exit 141 (SIGPIPE's), no error line."""
    model = tmp_path / "m"
    model.mkdir()
    for i in range(3000):  # a listing well over a pipe's buffer
        (model / f"tokenizer-{i:05d}.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat)
    command = f"{sys.executable} -m modelcar inspect oci:{tmp_path / '.modelcar' / 'oci'}:m | head -1"
    done = subprocess.run(["bash", "-c", command + "; echo ${PIPESTATUS[0]} >&2"], capture_output=True, text=True)
    assert done.stdout.startswith(f"oci:{tmp_path / '.modelcar' / 'oci'}:m  sha256:")
    assert done.stderr == "141\n"
    # a failure is still said, and ends the run as one (2: a base that is not there is the catalog's to fix)
    bad = "oci:/nonexistent:x@sha256:" + "a" * 64
    write_catalog(cat, f"models:\n  - name: m\n    path: ./m\n  - name: b\n    path: ./m\n    base: {bad}\n")
    command = f"{sys.executable} -m modelcar build -c {cat} | true"
    done = subprocess.run(["bash", "-c", command + "; echo ${PIPESTATUS[0]} >&2"], capture_output=True, text=True)
    assert "error: b: " in done.stderr and done.stderr.endswith("\n2\n"), done.stderr


def test_a_token_realm_not_over_https_gets_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTPS registry whose challenge names a plain-HTTP token realm: the token request (Basic
    credentials in it) went out in the clear, to wherever the realm said."""
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import AuthError, RegistryOptions
    from tests.registry import TokenServer, start_registry

    r = start_registry(tmp_path / "r", tls=True, token=TokenServer(tmp_path / "token"))
    try:
        assert r.token_server is not None and r.token_server.realm.startswith("http://")
        _write_json(tmp_path / "docker" / "config.json", {"auths": {r.host: {"auth": "dXNlcjpwYXNz"}}})
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        store = RegistryStore(f"{r.host}/team", RegistryOptions.create(ca_file=r.ca_file))
        with pytest.raises(AuthError, match=r"asks for a token from http://.*, not over HTTPS: credentials are not"):
            store.has_manifest("team/model", "latest")
        assert r.token_server.requests == []  # nothing sent there
    finally:
        r.stop()


def test_a_token_answer_without_measure_is_cut_off(token_registry: Registry) -> None:
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import AuthError, RegistryOptions

    r = token_registry
    assert r.token_server is not None
    r.token_server.padding = 2 << 20
    store = RegistryStore(f"{r.host}/{r.unique_repo()}", RegistryOptions.create())
    with pytest.raises(AuthError, match=r"token service .* sent more than 1048576 bytes: not a token"):
        store.has_manifest("x/model", "latest")


def test_a_challenge_from_where_a_blob_was_sent_on_gets_no_credentials(
    registry: Registry, fault_proxy: FaultProxy, _no_user_credentials: Path
) -> None:
    """A blob GET redirected to a CDN that answers 401 with a Bearer realm of its own: that is no
    challenge of the registry's, and the user's credentials for the registry go nowhere near it."""
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import RegistryError

    secret = "s3cret-for-the-registry"
    _write_json(_no_user_credentials / "config.json", {"auths": {fault_proxy.host: _auth_entry("user", secret)}})
    cdn, realm = FaultProxy(registry.url).start(), FaultProxy(registry.url).start()
    try:
        blob = os.urandom(100_000)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        RegistryStore(f"{fault_proxy.host}/cdn", write=True).put_blob("cdn/x", len(blob), lambda: [blob], digest)
        fault_proxy.fail(None, f"/v2/cdn/x/blobs/{digest}$", 307, headers={"Location": f"{cdn.url}/b"}, times=100)
        cdn.fail(
            None, "", 401, headers={"WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="s"'}, times=100
        )
        with pytest.raises(RegistryError):
            b"".join(RegistryStore(f"{fault_proxy.host}/cdn").open_blob("cdn/x", digest))
        assert cdn.count("GET") >= 1 and realm.count() == 0
        assert all(e.authorization is None for e in cdn.exchanges)
    finally:
        cdn.stop()
        realm.stop()


@pytest.mark.parametrize("status", [403, 400])
def test_a_blob_head_refused_is_an_error_not_a_blob_there(
    status: int, cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Only 200 says the registry has a blob and only 404 that it has not: a HEAD refused (403) or
    malformed (400) taken as "there" would push an image whose layers the registry lacks."""
    cat = _catalog(tmp_path, {**SMALL, "model.safetensors": _big(LARGE_FILE, 7)})
    cli("build", "-c", cat)
    fault_proxy.fail("HEAD", r"/blobs/sha256:", status, times=1000)
    result = cli("push", "-c", cat, "--registry", f"{fault_proxy.host}/{uuid.uuid4().hex}", code=1)
    assert ("is denied" if status == 403 else f"HTTP {status}") in result.stderr
    assert fault_proxy.count("PUT", r"/manifests/") == 0


def test_a_registry_that_stores_another_manifest_digest_is_an_error(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A registry that re-serialises a manifest stores other bytes than we hashed: the lock would
    pin a digest the registry does not hold. Its Docker-Content-Digest says so."""
    cat = _catalog(tmp_path, SMALL)
    cli("build", "-c", cat)
    other = "sha256:" + "b" * 64
    fault_proxy.reheader("PUT", r"/manifests/", {"Docker-Content-Digest": other}, times=1000)
    result = cli("push", "-c", cat, "--registry", f"{fault_proxy.host}/{uuid.uuid4().hex}", code=1)
    assert other in result.stderr
    assert "image" not in _locked(cat) or "repository" not in _locked(cat)["image"]


def test_chunks_say_which_bytes_they_carry(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """The distribution spec asks each chunk's PATCH for its Content-Range: one session's ranges
    run from byte 0 on, each where the last ended."""
    cat = _catalog(tmp_path, {**SMALL, "model.safetensors": _big(LARGE_FILE + 5, 8)})
    cli("build", "-c", cat)
    cli("push", "-c", cat, "--registry", f"{fault_proxy.host}/{uuid.uuid4().hex}", "--upload-chunk-size", str(4 * MiB))
    sessions: dict[str, list[tuple[int, int]]] = {}
    for e in fault_proxy.exchanges:
        if e.method == "PATCH":
            assert e.content_range is not None, e.path
            first, last = map(int, e.content_range.split("-"))
            sessions.setdefault(e.path.split("?")[0], []).append((first, last))
    assert max(len(r) for r in sessions.values()) >= 4  # the weights' layer, in 4 MiB chunks
    for ranges in sessions.values():
        assert ranges[0][0] == 0 and all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)), ranges
        assert all(last - first + 1 <= 4 * MiB for first, last in ranges)


def test_a_registry_that_never_answers_fails_within_the_retry_deadline(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A registry that takes the request and says nothing: no wait is longer than --retry-deadline
    (a read waited 600 s before; this test's timeout is 300 s)."""
    cat = _catalog(tmp_path, SMALL)
    cli("build", "-c", cat)
    fault_proxy.stall(None, "/v2/", seconds=280, times=100)
    try:
        prefix = f"{fault_proxy.host}/{uuid.uuid4().hex}"
        result = cli("push", "-c", cat, "--registry", prefix, "--retry-deadline", "2", "--max-retries", "0", code=1)
    finally:
        fault_proxy.release()
    assert "ReadTimeout" in result.stderr


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (
            'Bearer realm="https://a/token",service="reg",scope="repository:x:pull"',
            [("bearer", {"realm": "https://a/token", "service": "reg", "scope": "repository:x:pull"})],
        ),
        (
            'Bearer realm="https://a/token",service="reg", Basic realm="reg"',
            [("bearer", {"realm": "https://a/token", "service": "reg"}), ("basic", {"realm": "reg"})],
        ),
        (
            'Basic realm="reg", Bearer Realm="https://a/t?x=1", Service=reg.example.com:5000',
            [("basic", {"realm": "reg"}), ("bearer", {"realm": "https://a/t?x=1", "service": "reg.example.com:5000"})],
        ),
        (
            'BEARER realm = "a \\"b\\" c" , error="insufficient_scope"',
            [("bearer", {"realm": 'a "b" c', "error": "insufficient_scope"})],
        ),
        ("Negotiate abc==, Basic realm=x", [("negotiate", {}), ("basic", {"realm": "x"})]),
        ("Basic", [("basic", {})]),
        ("", []),
    ],
)
def test_every_challenge_of_a_www_authenticate_header_is_read_whole(
    header: str, parsed: list[tuple[str, dict[str, str]]]
) -> None:
    from modelcar.stores.registry_client import challenges

    assert challenges(header) == parsed


def test_a_bearer_challenge_among_others_unquoted_with_a_query_in_its_realm_gets_a_token(
    token_registry: Registry, _no_user_credentials: Path
) -> None:
    """A registry (or a proxy before it) that offers Basic beside Bearer, sends the service bare, and
    names a token service whose URL carries a query of its own: the Bearer challenge's parameters
    only, the service as sent, the realm's query kept (docker and containerd do so). Before, the
    Basic challenge's realm took the Bearer's place and the push failed, retried for minutes."""
    from modelcar.stores.registry import RegistryStore

    r = token_registry
    assert r.token_server is not None
    realm = FaultProxy(r.token_server.url).start()
    try:
        with FaultProxy(r.url) as proxy:
            offered = (
                f'Basic realm="registry", Bearer realm="{realm.url}/token?tenant=acme",service={r.token_server.service}'
            )
            proxy.reheader(None, "", {"WWW-Authenticate": offered}, times=1 << 20)
            config = {"auths": {proxy.host: _auth_entry("alice", r.token_server.users["alice"])}}
            _write_json(_no_user_credentials / "config.json", config)
            blob = os.urandom(1000)
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            r.token_server.requests.clear()
            store = RegistryStore(f"{proxy.host}/{r.unique_repo()}", write=True)
            assert store.put_blob(f"{store.path}/m", len(blob), lambda: [blob], digest) == digest
            assert store.has_blob(f"{store.path}/m", digest)
        asked = [e.path for e in realm.exchanges]
        assert asked and all(p.startswith("/token?tenant=acme&service=") for p in asked), asked
        assert {req.service for req in r.token_server.requests} == {r.token_server.service}
        assert {req.user for req in r.token_server.requests} == {"alice"}
    finally:
        realm.stop()


@pytest.mark.parametrize("realm", ["registry", "/token", ""])
def test_a_token_challenge_naming_no_token_service_url_is_said_at_once(
    realm: str, fault_proxy: FaultProxy, _no_user_credentials: Path
) -> None:
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import AuthError

    fault_proxy.fail(None, "", 401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}, times=100)
    store = RegistryStore(f"{fault_proxy.host}/x", RegistryOptions.create(retry=RetryPolicy(max_retries=5)))
    with pytest.raises(
        AuthError, match=re.escape(f"the registry's token challenge names no token service URL ({realm!r})")
    ):
        store.has_manifest("x/model", "latest")
    assert [e.method for e in fault_proxy.exchanges] == ["GET", "HEAD"]  # the ping, the request: no retry


def test_an_anonymous_user_a_token_registry_refuses_is_told_to_log_in(
    token_registry: Registry, _no_user_credentials: Path
) -> None:
    """Docker Hub, GHCR and Quay give anonymous tokens: a refusal of one is mostly a `docker login`
    forgotten (or made for another name of the registry), not an admin's to grant."""
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import AuthError

    r = token_registry
    store = RegistryStore(f"{r.host}/{r.unique_repo()}")
    with pytest.raises(
        AuthError,
        match=rf"{re.escape(r.host)}: anonymous access is not granted repository:\S+:pull: "
        rf"run `docker login {re.escape(r.host)}`",
    ):
        store.has_manifest(f"{store.path}/m", "latest")


def _rotating_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> tuple[Path, Path]:
    """A `docker-credential-mcrot` that hands out whatever USER:SECRET its file holds now (as gcloud's
    and ECR's helpers hand out a new short-lived secret); returns (that file, its calls' log)."""
    bindir, current, calls = tmp_path / "rot-bin", tmp_path / "rot-current", tmp_path / "rot-calls.log"
    bindir.mkdir()
    script = bindir / "docker-credential-mcrot"
    script.write_text(
        "#!/bin/sh\n"
        "read -r server\n"
        f'echo "$1 $server" >> "{calls}"\n'
        f'[ "$1" = get ] && [ "$server" = "{host}" ] || exit 1\n'
        f'IFS=: read -r user secret < "{current}"\n'
        'printf \'{"ServerURL": "%s", "Username": "%s", "Secret": "%s"}\\n\' "$server" "$user" "$secret"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "rot-docker"))
    _write_json(tmp_path / "rot-docker" / "config.json", {"credHelpers": {host: "mcrot"}})
    return current, calls


def test_a_helper_s_secret_refused_midway_is_asked_for_again(
    token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror that outlives the helper's secret (gcloud's access token: an hour): the token
    service refuses it for the next scope, the helper is asked once more, and the run goes on."""
    from modelcar.stores.registry import RegistryStore

    r = token_registry
    assert r.token_server is not None
    current, calls = _rotating_helper(tmp_path, monkeypatch, r.host)
    r.token_server.users["robot"] = "secret-1"
    r.token_server.grants["robot"] = {"*": ["pull", "push"]}
    current.write_text("robot:secret-1\n")
    store = RegistryStore(f"{r.host}/{r.unique_repo()}", write=True)
    blob = os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    store.put_blob(f"{store.path}/a", len(blob), lambda: [blob], digest)
    r.token_server.users["robot"] = "secret-2"  # rotated: the first one is refused from now on
    current.write_text("robot:secret-2\n")
    store.put_blob(f"{store.path}/b", len(blob), lambda: [blob], digest)  # another scope: a new token
    assert store.has_blob(f"{store.path}/b", digest)
    assert calls.read_text().splitlines() == [f"get {r.host}"] * 2
    r.token_server.users["robot"] = "secret-3"  # the helper's secret refused, and no other from it
    other = os.urandom(1000)  # a blob no repository holds: no mount asked for first
    with pytest.raises(AuthError, match="authentication failed for user 'robot' from docker-credential-mcrot"):
        store.put_blob(f"{store.path}/c", len(other), lambda: [other], "sha256:" + hashlib.sha256(other).hexdigest())
    assert len(calls.read_text().splitlines()) == 3  # asked once more, not again and again


def test_basic_credentials_of_a_helper_refused_midway_are_asked_for_again(
    tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelcar.stores.registry import RegistryStore

    r = tls_registry
    with FaultProxy(r.url, ssl_context=r.ssl_context()) as proxy:
        current, calls = _rotating_helper(tmp_path, monkeypatch, proxy.host)
        current.write_text(f"user:{r.users['user']}\n")
        store = RegistryStore(f"{proxy.host}/{r.unique_repo()}", RegistryOptions.create(ca_file=r.ca_file))
        assert not store.has_manifest(f"{store.path}/m", "latest")
        current.write_text(f"other:{r.users['other']}\n")  # rotated: the first is refused once, below
        proxy.fail(None, "", 401, headers={"WWW-Authenticate": 'Basic realm="registry"'}, times=1)
        assert not store.has_manifest(f"{store.path}/m", "v2")
        assert calls.read_text().splitlines() == [f"get {proxy.host}"] * 2
        sent = [base64.b64decode(e.authorization.split()[1]).decode() for e in proxy.exchanges if e.authorization]
        assert sent[-1] == f"other:{r.users['other']}" and sent[-2] == f"user:{r.users['user']}"


def test_a_registry_s_own_words_on_a_refusal_or_a_limit_are_passed_on(
    fault_proxy: FaultProxy, _no_user_credentials: Path
) -> None:
    """Docker Hub's pull limit says to log in, GHCR's refusal names the permission it lacks: said
    with modelcar's line, not dropped for "HTTP 429" or "is denied"."""
    from modelcar.stores.registry import RegistryStore

    denied = b'{"errors": [{"code": "DENIED", "message": "permission_denied: write_package"}]}'
    fault_proxy.fail("GET", "/manifests/", 403, body=denied, times=1)
    store = RegistryStore(f"{fault_proxy.host}/x", RegistryOptions.create(retry=RetryPolicy(max_retries=0)))
    said = r"is denied \(repository:x/m:pull\) \(the registry says: DENIED: permission_denied: write_package\)"
    with pytest.raises(AuthError, match=said):
        store.get_manifest("x/m", "latest")
    limit = b'{"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your pull rate limit"}]}'
    fault_proxy.fail("GET", "/manifests/", 429, body=limit, times=1)
    with pytest.raises(RegistryError, match=r"\(HTTP 429: TOOMANYREQUESTS: You have reached your pull rate limit\)"):
        store.get_manifest("x/m", "latest")
    fault_proxy.fail("GET", "/manifests/", 503, body=b"<html>" + b"x" * 100_000, times=1)
    with pytest.raises(RegistryError, match=r"\(HTTP 503\); raise --max-retries"):
        store.get_manifest("x/m", "latest")


def test_an_identity_token_goes_by_get_where_the_token_service_takes_no_oauth_form(
    token_registry: Registry, _no_user_credentials: Path
) -> None:
    """A token service answering the OAuth refresh-token POST 404 (GCR) or 405: the token is asked
    for by GET with the identity token as basic credentials, as docker and containerd fall back."""
    from modelcar.stores.registry import RegistryStore

    r = token_registry
    ts = r.token_server
    assert ts is not None
    ts.users["<token>"] = "alice-refresh-token"  # how such a service takes an identity token
    ts.grants["<token>"] = {"*": ["pull", "push"]}
    realm = FaultProxy(ts.url).start()
    try:
        realm.fail("POST", "/token", 405, times=1 << 20)
        with FaultProxy(r.url) as proxy:
            offered = f'Bearer realm="{realm.url}/token",service="{ts.service}"'
            proxy.reheader(None, "", {"WWW-Authenticate": offered}, times=1 << 20)
            _write_json(
                _no_user_credentials / "config.json", {"auths": {proxy.host: {"identitytoken": "alice-refresh-token"}}}
            )
            store = RegistryStore(f"{proxy.host}/{r.unique_repo()}", write=True)
            blob = os.urandom(1000)
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            assert store.put_blob(f"{store.path}/m", len(blob), lambda: [blob], digest) == digest
            assert store.has_blob(f"{store.path}/other", digest) is False  # another scope: GET at once
        assert [e.method for e in realm.exchanges] == ["POST", "GET", "GET"]
        assert {(q.user, q.grant_type) for q in ts.requests} == {("<token>", None)}
    finally:
        realm.stop()


def test_a_401_that_says_no_way_to_log_in_is_said_so(fault_proxy: FaultProxy, _no_user_credentials: Path) -> None:
    from modelcar.stores.registry import RegistryStore

    fault_proxy.fail(None, "", 401, times=100)
    with pytest.raises(AuthError, match="HTTP 401 with no WWW-Authenticate header, nothing saying how to log in"):
        RegistryStore(f"{fault_proxy.host}/x").has_manifest("x/m", "latest")
    fault_proxy.clear()
    fault_proxy.fail(None, "", 401, headers={"WWW-Authenticate": ",,,"}, times=100)
    with pytest.raises(AuthError, match=r"HTTP 401 with a WWW-Authenticate header naming no challenge \(',,,'\)"):
        RegistryStore(f"{fault_proxy.host}/x").has_manifest("x/m", "latest")


def test_a_registry_s_words_are_printed_without_credentials_escapes_or_extra_lines(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path, _no_user_credentials: Path
) -> None:
    """A registry's error document is quoted in the error line and in --json: a URL's user:password
    in it is taken out before it is cut to length (cut first, the `@` that marks them went, and
    the password with it was printed), terminal escapes are written out, line breaks folded (a
    second `error:` line was the server's to forge)."""
    message = "x" * 262 + " retry via https://robot:hunter2-SECRET@proxy.example/v2/ \x1b]0;pwned\x07\nerror: forged"
    body = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
    fault_proxy.fail("POST", "/blobs/uploads/", 403, body=body, times=1000)
    cat = _catalog(tmp_path, SMALL)
    cli("build", "-c", cat)
    result = cli("push", "-c", cat, "--registry", f"{fault_proxy.host}/x", "--json", code=1)
    out = result.stdout + result.stderr
    assert "DENIED: xxx" in result.stderr and "hunter2" not in out and "robot:" not in out
    assert "\x1b" not in out and "\x07" not in out
    assert not [line for line in result.stderr.splitlines() if line.startswith("error: forged")]
    assert "hunter2" not in json.dumps(json.loads(result.stdout))


def test_an_error_answer_whose_body_stalls_is_not_waited_out(_no_user_credentials: Path) -> None:
    """A 503 page that sends a few bytes and then nothing: reading it for its words held each
    attempt for the whole read timeout (up to 600 s), past --retry-deadline."""
    from modelcar.stores.registry import RegistryStore

    release = threading.Event()
    safety = threading.Timer(120, release.set)
    safety.start()
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while not release.is_set():
                conn, _ = server.accept()
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    if not (got := conn.recv(4096)):
                        return
                    data += got
                if b" /v2/ " in data.split(b"\r\n", 1)[0]:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                conn.sendall(b'HTTP/1.1 503 Unavailable\r\nContent-Length: 1000\r\n\r\n{"errors"')
                release.wait()
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = server.getsockname()[1]
        store = RegistryStore(f"127.0.0.1:{port}/x", RegistryOptions.create(retry=RetryPolicy(max_retries=0)))
        with pytest.raises(RegistryError, match="HTTP 503"):
            store.get_manifest("x/m", "latest")
        assert not release.is_set()  # given up while the server still held its answer
    finally:
        release.set()
        safety.cancel()
        server.close()


def test_an_upload_s_session_is_not_closed_on_a_registry_that_stopped_answering(fault_proxy: FaultProxy) -> None:
    """Its DELETE would wait as long as the request that failed: an upload whose connection
    dropped starts again from a new session, and leaves that one to the registry to expire."""
    from modelcar.stores.registry import RegistryStore

    fault_proxy.drop("PUT", r"/blobs/uploads/", times=1)
    store = RegistryStore(f"{fault_proxy.host}/drop", write=True)
    blob = os.urandom(300_000)
    assert store.put_blob("drop/x", len(blob), lambda: [blob], digest_of(blob)) == digest_of(blob)
    assert fault_proxy.count("POST", r"/blobs/uploads/") == 2 and fault_proxy.count("DELETE") == 0
