"""The registry fixtures and the fault proxy work, as seen by real clients (skopeo, httpx)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import require_tool

if TYPE_CHECKING:  # imported by pytest as a plugin, before this module, so that its asserts are rewritten
    from tests.faultproxy import FaultProxy
    from tests.registry import Registry


MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(directory: Path, content: bytes = b"hello\n", tag: str = "latest") -> tuple[Path, bytes]:
    """A minimal one-layer OCI image layout; returns (layout, manifest bytes)."""
    (directory / "blobs" / "sha256").mkdir(parents=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    layer = buf.getvalue()
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(directory, layer)}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_blob(directory, json.dumps(config).encode()),
    }
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config_desc, "layers": [layer_desc]}, indent=1
    ).encode()  # indented: a client that re-serialises it would change its digest
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                **_blob(directory, manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory, manifest


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    return oci_layout(tmp_path / "layout", content=os.urandom(64))


@pytest.fixture
def skopeo(tmp_path: Path) -> Iterator[object]:
    binary = require_tool("skopeo")
    auth = tmp_path / "no-auth.json"
    auth.write_text('{"auths":{}}')
    env = {
        **os.environ,
        "REGISTRY_AUTH_FILE": str(auth),
        "DOCKER_CONFIG": str(tmp_path / "no-docker-config"),
        "NO_PROXY": "127.0.0.1,localhost",
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [binary, "--insecure-policy", *args], capture_output=True, text=True, env=env, timeout=120
        )
        if check:
            assert result.returncode == 0, f"skopeo {' '.join(args)}:\n{result.stderr}"
        return result

    yield run


def push(skopeo, registry: Registry, layout: Path, repo: str, *, user: str | None = None, check: bool = True):  # type: ignore[no-untyped-def]
    return skopeo(
        "copy",
        "--preserve-digests",
        *registry.skopeo_args("dest", user),
        f"oci:{layout}:latest",
        f"docker://{registry.ref(repo)}",
        check=check,
    )


def inspect_raw(skopeo, registry: Registry, repo: str, *, user: str | None = None) -> bytes:  # type: ignore[no-untyped-def]
    return skopeo("inspect", "--raw", *registry.skopeo_args("", user), f"docker://{registry.ref(repo)}").stdout.encode()


def manifest_digest(manifest: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def test_plain_registry(registry: Registry, image: tuple[Path, bytes], skopeo) -> None:  # type: ignore[no-untyped-def]
    layout, manifest = image
    repo = registry.unique_repo()
    assert registry.scheme == "http" and registry.url == f"http://{registry.host}" and registry.auth is None
    push(skopeo, registry, layout, repo)
    assert inspect_raw(skopeo, registry, repo) == manifest
    status, headers, body = registry.request("GET", f"/v2/{repo}/manifests/latest", headers={"Accept": MANIFEST_TYPE})
    assert (status, body, headers["docker-content-digest"]) == (200, manifest, manifest_digest(manifest))
    assert (registry.root / "docker/registry/v2/repositories" / repo).is_dir()
    # delete is enabled
    status, _, _ = registry.request("DELETE", f"/v2/{repo}/manifests/{manifest_digest(manifest)}")
    assert status == 202


def test_tls_registry(tls_registry: Registry, image: tuple[Path, bytes], skopeo) -> None:  # type: ignore[no-untyped-def]
    r = tls_registry
    layout, manifest = image
    repo = r.unique_repo()
    assert r.scheme == "https" and r.ca_file and r.cert_dir and (r.username, r.password) == ("user", "pass")
    push(skopeo, r, layout, repo)
    assert inspect_raw(skopeo, r, repo) == manifest
    # the certificate is for 127.0.0.1 and localhost, and only our CA trusts it
    with httpx.Client(verify=r.ssl_context(), trust_env=False) as client:
        assert client.get(f"{r.url}/v2/").status_code == 401
        assert client.get(f"https://localhost:{r.port}/v2/", auth=("user", "pass")).status_code == 200
        assert client.get(f"{r.url}/v2/", auth=("user", "wrong")).status_code == 401
        other = client.get(
            f"{r.url}/v2/{repo}/manifests/latest", auth=("other", "other-pass"), headers={"Accept": MANIFEST_TYPE}
        )
        assert other.content == manifest
    with httpx.Client(trust_env=False) as client, pytest.raises(httpx.ConnectError):
        client.get(f"{r.url}/v2/")
    wrong = skopeo(
        "inspect", "--raw", f"--cert-dir={r.cert_dir}", "--creds=user:nope", f"docker://{r.ref(repo)}", check=False
    )
    assert wrong.returncode != 0


def test_token_registry(token_registry: Registry, image: tuple[Path, bytes], skopeo) -> None:  # type: ignore[no-untyped-def]
    from tests.registry import decode_jwt

    r = token_registry
    ts = r.token_server
    assert ts is not None and r.auth == "token" and r.username == "alice"
    layout, manifest = image
    repo = r.unique_repo()
    push(skopeo, r, layout, repo)
    assert inspect_raw(skopeo, r, repo, user="reader") == manifest
    assert ts.count(f"repository:{repo}:pull,push") >= 1
    assert ts.count(f"repository:{repo}:pull") >= 1
    assert {q.user for q in ts.requests} == {"alice", "reader"}

    # pull-only users cannot push
    denied = push(skopeo, r, layout, r.unique_repo(), user="reader", check=False)
    assert denied.returncode != 0

    # the token protocol, step by step
    with httpx.Client(trust_env=False) as client:
        challenge = client.get(f"{r.url}/v2/{repo}/manifests/latest")
        assert challenge.status_code == 401
        www = challenge.headers["www-authenticate"]
        assert www.startswith(f'Bearer realm="{ts.realm}"') and f'scope="repository:{repo}:pull"' in www
        before = ts.count()
        params = [("service", ts.service), ("scope", f"repository:{repo}:pull,push"), ("scope", "repository:x:pull")]
        got = client.get(ts.realm, params=params, auth=("reader", "reader-pass"))
        assert got.status_code == 200 and ts.count() == before + 1
        body = got.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300 and body["issued_at"]
        header, claims = decode_jwt(body["token"])
        assert header["alg"] == "ES256" and header["x5c"]
        assert claims["aud"] == ts.service and claims["iss"] == ts.issuer and claims["sub"] == "reader"
        assert claims["access"] == [
            {"type": "repository", "name": repo, "actions": ["pull"]},
            {"type": "repository", "name": "x", "actions": ["pull"]},
        ]
        auth = {"Authorization": f"Bearer {body['token']}", "Accept": MANIFEST_TYPE}
        assert client.get(f"{r.url}/v2/{repo}/manifests/latest", headers=auth).content == manifest
        assert client.post(f"{r.url}/v2/{repo}/blobs/uploads/", headers=auth).status_code == 401
        assert client.get(ts.realm, params=params, auth=("reader", "bad")).status_code == 401

        # an expired token is refused: lifetime 0 expires at once, whatever expires_in says
        ts.lifetime, ts.reported_expires_in = 0, 3600
        stale = client.get(ts.realm, params=params, auth=("alice", "alice-pass")).json()
        assert stale["expires_in"] == 3600
        stale_auth = {"Authorization": f"Bearer {stale['token']}", "Accept": MANIFEST_TYPE}
        assert client.get(f"{r.url}/v2/{repo}/manifests/latest", headers=stale_auth).status_code == 401


def test_token_registry_is_reset(token_registry: Registry) -> None:
    ts = token_registry.token_server
    assert ts is not None
    assert ts.count() == 0 and ts.lifetime == 300 and ts.reported_expires_in is None


def test_skopeo_through_proxy(
    registry: Registry,
    fault_proxy: FaultProxy,
    image: tuple[Path, bytes],
    skopeo,  # type: ignore[no-untyped-def]
) -> None:
    """skopeo 1.9 waits out a 429 on starting an upload, but gives up on a 503 (even with --retry-times)."""
    layout, manifest = image
    p = fault_proxy
    failed_repo, repo = registry.unique_repo(), registry.unique_repo()
    fault = p.fail_503("PATCH", r"/blobs/uploads/")
    failed = skopeo(
        "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:latest",
        f"docker://{p.host}/{failed_repo}:latest", check=False,
    )  # fmt: skip
    assert failed.returncode != 0 and "503" in failed.stderr and fault.hits == 1

    p.clear()
    fault = p.fail_429("POST", r"/blobs/uploads/", retry_after=1)
    skopeo(
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci:{layout}:latest",
        f"docker://{p.host}/{repo}:latest",
    )
    assert fault.hits == 1 and not p.pending()
    assert [e.status for e in p.exchanges if e.method == "POST"] == [429, 202, 202]  # layer, then config
    assert p.count("PATCH", r"/blobs/uploads/") == 2 and p.count("PUT", r"/manifests/latest$") == 1
    assert inspect_raw(skopeo, registry, repo) == manifest


def test_proxy_faults_with_httpx(registry: Registry, fault_proxy: FaultProxy) -> None:
    repo = registry.unique_repo()
    p = fault_proxy
    with httpx.Client(base_url=p.url, trust_env=False, timeout=30) as client:
        p.fail_429("POST", r"/blobs/uploads/", retry_after=7)
        p.fail_503(None, r"/blobs/uploads/")
        first = client.post(f"/v2/{repo}/blobs/uploads/")
        assert (first.status_code, first.headers["retry-after"]) == (429, "7")
        assert client.post(f"/v2/{repo}/blobs/uploads/").status_code == 503
        started = client.post(f"/v2/{repo}/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        assert location.startswith(p.url + f"/v2/{repo}/blobs/uploads/"), location

        # a dropped connection mid-upload: no answer at all
        data = os.urandom(1 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        p.drop("PUT", r"/blobs/uploads/", after_bytes=100_000)
        with pytest.raises(httpx.TransportError):
            client.put(f"{location}&digest={digest}", content=data)
        assert p.exchanges[-1].fault == "drop" and p.exchanges[-1].status is None
        assert p.exchanges[-1].request_bytes == 100_000

        # Content-Length body, then the upload session is still usable
        done = client.put(f"{location}&digest={digest}", content=data)
        assert done.status_code == 201, done.text
        assert done.headers["location"].startswith(p.url)
        head = client.head(f"/v2/{repo}/blobs/{digest}")
        assert (head.status_code, head.headers["content-length"]) == (200, str(len(data)))
        assert client.get(f"/v2/{repo}/blobs/{digest}").content == data

        # an upstream that answers before reading a large body: its answer comes through
        bogus = location.split("?")[0] + "?_state=bogus"
        early = client.put(f"{bogus}&digest={digest}", content=iter([data] * 8))
        assert early.status_code == 404 and "BLOB_UPLOAD" in early.text
        assert p.exchanges[-1].request_bytes == 8 * len(data)
    assert p.count("PUT", r"/blobs/uploads/") == 3
    assert p.count("POST") == 3 and not p.pending()
    assert [e.status for e in p.exchanges if e.method == "POST"] == [429, 503, 202]


def test_proxy_streams_a_large_chunked_body(registry: Registry, fault_proxy: FaultProxy) -> None:
    """A 64 MiB chunked PUT goes through without the proxy (or the client) holding it in memory."""
    repo = registry.unique_repo()
    piece = os.urandom(1 << 20)
    count = 64
    h = hashlib.sha256()
    for _ in range(count):
        h.update(piece)
    digest = f"sha256:{h.hexdigest()}"

    def body() -> Iterator[bytes]:
        for _ in range(count):
            yield piece

    with httpx.Client(base_url=fault_proxy.url, trust_env=False, timeout=60) as client:
        location = client.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
        tracemalloc.start()
        try:
            done = client.put(f"{location}&digest={digest}", content=body())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert done.status_code == 201, done.text
        assert peak < 8 << 20, peak
        head = client.head(f"/v2/{repo}/blobs/{digest}")
        assert head.headers["content-length"] == str(count << 20)
    put = [e for e in fault_proxy.exchanges if e.method == "PUT"]
    assert [(e.status, e.request_bytes) for e in put] == [(201, count << 20)]


def test_token_grants(tmp_path: Path) -> None:
    from tests.registry import TokenServer

    ts = TokenServer(
        tmp_path,
        users={"alice": "a", "reader": "r"},
        grants={"alice": {"repo/prefix/*": ["pull", "push"]}, "reader": {"*": ["pull"]}, "": {"public/*": ["pull"]}},
    )
    assert ts.grant("alice", ["repository:repo/prefix/x/y:pull,push,delete", "repository:other:pull"]) == [
        {"type": "repository", "name": "repo/prefix/x/y", "actions": ["pull", "push"]},
        {"type": "repository", "name": "other", "actions": []},
    ]
    assert ts.grant("reader", ["repository:a/b:push,pull", "registry:catalog:*"]) == [
        {"type": "repository", "name": "a/b", "actions": ["pull"]},
        {"type": "registry", "name": "catalog", "actions": []},
    ]
    assert ts.grant("", ["repository:public/m:pull,push"])[0]["actions"] == ["pull"]
    ts.stop()
