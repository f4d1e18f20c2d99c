"""Images travel: build --push, push, mirror, verify, inspect, hf-cache and base images, against a
real registry (Debian's docker-registry), read back by skopeo, umoci, oras-py and huggingface_hub."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from modelcar.image import LARGE_FILE, MEDIA_INDEX, MEDIA_MANIFEST, digest_of
from modelcar.stores import read_image
from modelcar.stores.spec import open_store
from tests.conftest import Cli, require_tool, write_catalog
from tests.fakehub import FakeHub
from tests.faultproxy import Fault, FaultProxy
from tests.registry import Registry

ANN_REF = "org.opencontainers.image.ref.name"
BIG = bytes(range(256)) * (LARGE_FILE // 256) + b"big"
FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "tokenizer.json": b'{"version": "1.0"}\n',
    "sub/merges.txt": b"a b\nc d\n",
    "model.safetensors": BIG,
}


def _model(root: Path, files: dict[str, bytes] = FILES) -> None:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def _catalog(tmp_path: Path, models: str = "  - name: tiny\n    path: ./m\n    tags: [stable]\n") -> Path:
    _model(tmp_path / "m")
    return write_catalog(tmp_path / "catalog.yaml", "models:\n" + models)


def _lock(cat: Path) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]


def _skopeo_raw(ref: str, *, config: bool = False) -> bytes:
    """The manifest (or, with `config`, the image config) skopeo reads at `ref`."""
    skopeo = require_tool("skopeo")
    args = ["--config"] if config else []
    return subprocess.run(
        [skopeo, "inspect", *args, "--raw", "--tls-verify=false", f"docker://{ref}"], capture_output=True, check=True
    ).stdout


def _uploads(proxy: FaultProxy) -> int:
    return proxy.count("PUT", r"/blobs/uploads/") + proxy.count("PATCH", r"/blobs/uploads/")


def test_build_push_is_read_by_skopeo_and_oras(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    import oras.provider

    cat = _catalog(tmp_path)
    prefix = f"{registry.host}/{registry.unique_repo('team')}"
    result = cli("build", "-c", cat, "--push", "--registry", prefix, "--json")
    (model,) = json.loads(result.stdout)["models"]
    entry = _lock(cat)["tiny"]
    digest = entry["image"]["digest"]
    assert model["digest"] == digest
    assert entry["image"]["repository"] == f"{prefix}/tiny"
    assert not (tmp_path / ".modelcar" / "oci").exists()  # pushed straight, no layout on the way
    # the log says where it went, as a reference a user can pull, and under which tags; --json too
    assert f"-> {prefix}/tiny@{digest} (tags: {entry['commit'][:12]}, stable)" in result.stderr
    assert model["reference"] == f"{prefix}/tiny@{digest}"
    layout = json.loads(cli("build", "-c", cat, "--json").stdout)["models"][0]["reference"]
    assert json.loads(cli("inspect", layout, "--json").stdout)["digest"] == digest  # it reads back

    for tag in (entry["commit"][:12], "stable"):
        raw = _skopeo_raw(f"{prefix}/tiny:{tag}")
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest  # the registry stores our exact bytes
    index = json.loads(raw)
    assert index["mediaType"] == MEDIA_INDEX and len(index["manifests"]) == 2

    client = oras.provider.Registry(registry.host, insecure=True)
    repo = prefix.split("/", 1)[1] + "/tiny"
    manifest = client.get_manifest(f"{registry.host}/{repo}@{index['manifests'][0]['digest']}")
    big = next(layer for layer in manifest["layers"] if layer["size"] > LARGE_FILE)
    out = tmp_path / "layer.tar"
    client.download_blob(f"{registry.host}/{repo}", big["digest"], str(out))
    assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == big["digest"]
    with tarfile.open(out) as tf:
        member = tf.extractfile("models/model.safetensors")
        assert member is not None and member.read() == BIG


def test_second_push_uploads_nothing_and_shared_layers_are_mounted(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    cat = _catalog(tmp_path, "  - name: one\n    path: ./m\n  - name: two\n    path: ./m\n")
    prefix = f"{fault_proxy.host}/mount"
    cli("build", "-c", cat, "--push", "--registry", prefix, "--jobs", "1")
    assert fault_proxy.count("POST", r"/v2/mount/two/blobs/uploads/\?mount=sha256:") >= 2  # both layers
    # model two's blobs (its layers and configs equal model one's) crossed no wire: all mounted
    assert fault_proxy.count("PUT", r"/v2/mount/two/blobs/uploads/") == 0
    assert fault_proxy.count("PATCH", r"/v2/mount/two/blobs/uploads/") == 0
    lock = _lock(cat)
    assert lock["one"]["image"]["digest"] != lock["two"]["image"]["digest"]  # titles differ

    fault_proxy.clear()
    cli("build", "-c", cat, "--push", "--registry", prefix)
    # Each model's image as the lock and its tag name it is read; what it holds is not asked about
    # again, nor put again: two rounds of GETs, and nothing else.
    assert _uploads(fault_proxy) == 0
    assert fault_proxy.count("HEAD", r"/blobs/") == 0
    assert fault_proxy.count("PUT", r"/manifests/") == 0
    # each model's index read by the lock's digest, each platform's manifest once; its commit's tag
    # asked by a HEAD (the same image: not read again; a GET is a pull on Docker Hub's limits)
    assert fault_proxy.count("GET", r"/v2/mount/(one|two)/manifests/") == 2 * (1 + 2)
    assert fault_proxy.count("HEAD", r"/v2/mount/(one|two)/manifests/") == 2


def test_an_upload_location_relative_to_the_request_is_followed(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The distribution spec allows a relative Location; `<uuid>?_state=...` after a POST to
    `.../blobs/uploads/` is relative to that URL (RFC 3986), not to the registry's root."""
    cat = _catalog(tmp_path)
    relative = fault_proxy.relocate(
        None,
        r"/blobs/uploads/",
        lambda loc: urlsplit(loc).path.rsplit("/", 1)[1] + "?" + urlsplit(loc).query,
        times=1000,
    )
    cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/rel")  # a whole PATCH, then PUT
    cli(  # --no-cache: chunks sent, not mounted from rel/
        "build",
        "-c",
        cat,
        "--push",
        "--registry",
        f"{fault_proxy.host}/rel2",
        "--upload-chunk-size",
        str(1 << 20),
        "--no-cache",
    )
    assert relative.hits >= 2 * 3 + 16 + 1  # POSTs of both pushes, the chunks and the first PATCH
    digest = _lock(cat)["tiny"]["image"]["digest"]
    for prefix in ("rel", "rel2"):
        assert digest_of(_skopeo_raw(f"{fault_proxy.host}/{prefix}/tiny@{digest}")) == digest


REFUSALS = {
    "artifact-registry": (405, b'{"errors":[{"code":"UNSUPPORTED","message":"chunked upload is not supported"}]}'),
    "ghcr": (416, b'{"errors":[{"code":"REQUESTED_RANGE_NOT_SATISFIABLE","message":"exceeds 4.00MiB"}]}'),
    # the spec's code for an operation a registry does not do, under a 400 (its status unspecified)
    "unsupported-400": (400, b'{"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]}'),
}


@pytest.mark.parametrize("registry_kind", sorted(REFUSALS))
def test_a_registry_that_refuses_a_streamed_upload_gets_the_layer_in_one_put(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path, registry_kind: str
) -> None:
    """A cold build --push streams a new layer in one PATCH while hashing it (its digest is known
    only at the end). Some registries refuse that PATCH: the layer is hashed first, then PUT."""
    status, body = REFUSALS[registry_kind]
    fault_proxy.fail("PATCH", r"/blobs/uploads/", status, body=body, times=1000)
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/{registry_kind}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    assert fault_proxy.count("PATCH") <= 2  # each new layer's (two, in parallel), refused once
    digest = _lock(cat)["tiny"]["image"]["digest"]
    assert digest_of(_skopeo_raw(f"{prefix}/tiny@{digest}")) == digest
    cli("verify", "-c", cat, "--from", prefix)


def test_a_refused_streamed_upload_is_not_tried_again_on_that_registry(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    from modelcar.stores.registry import RegistryStore

    fault_proxy.fail("PATCH", r"/blobs/uploads/", 405, times=1000)
    store = RegistryStore(f"{fault_proxy.host}/learn", write=True)
    blobs = [os.urandom(300_000) for _ in range(3)]
    for blob in blobs:  # digests unknown to the caller, as a new layer's
        assert store.put_blob("learn/x", len(blob), lambda blob=blob: [blob]) == digest_of(blob)
    assert fault_proxy.count("PATCH") == 1
    assert fault_proxy.count("DELETE", r"/blobs/uploads/") == 1  # the refused session, closed
    assert fault_proxy.count("PUT", r"/blobs/uploads/.*digest=sha256:") == 3
    blob = blobs[0]  # one the registry holds is found, not sent again
    fault_proxy.clear()
    assert store.put_blob("learn/x", len(blob), lambda: [blob]) == digest_of(blob)
    assert _uploads(fault_proxy) == 0


def test_an_upload_retried_closes_the_session_it_gives_up(fault_proxy: FaultProxy) -> None:
    """A 503 on an upload's PUT: the upload starts again from a new session, and the one given up
    is closed, not left open on the registry until it expires (one per retried blob)."""
    from modelcar.stores.registry import RegistryStore

    fault_proxy.fail_503("PUT", r"/blobs/uploads/", times=1)
    store = RegistryStore(f"{fault_proxy.host}/retry", write=True)
    blob = os.urandom(300_000)
    assert store.put_blob("retry/x", len(blob), lambda: [blob], digest_of(blob)) == digest_of(blob)
    assert fault_proxy.count("POST", r"/blobs/uploads/") == 2
    assert fault_proxy.count("DELETE", r"/blobs/uploads/") == 1
    assert store.has_blob("retry/x", digest_of(blob))


@pytest.mark.parametrize(
    ("method", "args", "advice"),
    [
        ("PATCH", ["--upload-chunk-size", str(1 << 20)], "lower --upload-chunk-size"),
        ("PUT", [], "send chunks (--upload-chunk-size)"),
    ],
)
def test_a_body_too_large_for_the_registry_says_what_to_change(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path, method: str, args: list[str], advice: str
) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)  # digests known: one PUT per blob, or chunks
    fault_proxy.fail(method, r"/blobs/uploads/", 413, times=1000)
    result = cli("push", "-c", cat, "--registry", f"{fault_proxy.host}/big", *args, code=1)
    assert "HTTP 413" in result.stderr and advice in result.stderr, result.stderr


def test_a_push_that_fails_for_one_model_pushes_and_records_the_others(
    cli: Cli, registry: Registry, tmp_path: Path
) -> None:
    """One model not built (or refused by the registry) stopped the push at it, and the models
    already pushed were not recorded in the lock: `patch` could not pin them."""
    _model(tmp_path / "m")
    models = "  - name: built\n    path: ./m\n  - name: other\n    path: ./m\n  - name: last\n    path: ./m\n"
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + models)
    cli("build", "-c", cat, "built", "last")
    cli("lock", "-c", cat)
    prefix = f"{registry.host}/{registry.unique_repo()}"
    result = cli("push", "-c", cat, "--registry", prefix, "--json", code=1)
    doc = json.loads(result.stdout)
    assert [m["name"] for m in doc["models"]] == ["built", "last"] and "other: " in doc["error"]
    assert f"no image digest in the lock: run `modelcar build other -c {cat}`" in result.stderr
    # the failed model by name, for a machine (as build's models[].error)
    (failed,) = doc["failed"]
    assert failed["name"] == "other" and f"run `modelcar build other -c {cat}`" in failed["error"]
    lock = _lock(cat)
    assert lock["built"]["image"]["repository"] == f"{prefix}/built" and lock["last"]["image"]["repository"]
    assert "image" not in lock["other"]


def test_a_push_whose_lock_cannot_be_written_says_so_with_every_model_s_failure(
    cli: Cli, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog directory this user may not write: the lock's error replaced the run's, and the
    model that failed, and the --json results, were never reported."""
    import errno

    from modelcar import lock as lock_module

    _model(tmp_path / "m")
    models = "  - name: built\n    path: ./m\n  - name: other\n    path: ./m\n"
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + models)
    cli("build", "-c", cat, "built")
    cli("lock", "-c", cat)

    def read_only(*args: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(lock_module, "save_entries", read_only)
    prefix = f"{registry.host}/{registry.unique_repo()}"
    result = cli("push", "-c", cat, "--registry", prefix, "--json", code=1)
    doc = json.loads(result.stdout)
    assert [m["name"] for m in doc["models"]] == ["built"]
    assert "other: " in doc["error"] and f"run `modelcar build other -c {cat}`" in doc["error"]
    lock = cat.with_suffix(".lock")
    assert f"{tmp_path}: Permission denied: the images were pushed, {lock} does not record them" in doc["error"]
    # each model the run did not get into the lock is failed, by name: the one not built, and the
    # one pushed that the lock does not record
    failed = {f["name"]: f["error"] for f in doc["failed"]}
    assert sorted(failed) == ["built", "other"] and "does not record them" in failed["built"]


def test_an_interrupted_push_says_a_lock_it_could_not_write(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after one model went up, in a catalog directory this user may not write: the push
    recorded nothing and said nothing of it."""
    import errno

    from modelcar import copy
    from modelcar import lock as lock_module
    from modelcar.catalog import load_catalog
    from modelcar.stores.layout import LayoutStore
    from modelcar.stores.registry import RegistryStore

    _model(tmp_path / "m")
    models = "  - name: first\n    path: ./m\n  - name: second\n    path: ./m\n"
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + models)
    Cli()("build", "-c", cat)

    def read_only(*args: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    real_copy = copy.copy_image

    def interrupted_at_the_second(*args: Any, **kwargs: Any) -> Any:
        if args[1] == "second":
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(lock_module, "save_entries", read_only)
    monkeypatch.setattr(copy, "copy_image", interrupted_at_the_second)
    catalog = load_catalog(cat)
    store = RegistryStore(f"{registry.host}/{registry.unique_repo()}", write=True)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("modelcar").addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            copy.push_models(catalog, None, store, LayoutStore(tmp_path / ".modelcar" / "oci"))
    finally:
        logging.getLogger("modelcar").removeHandler(handler)
    assert (
        f"{tmp_path}: Permission denied: the images were pushed, {catalog.lock_file} does not record them: fix "
        "that and push again (nothing is sent twice)" in said
    )


def test_a_mirror_within_one_registry_mounts_every_blob(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """Promoting images from one repository prefix to another of the same registry sends no
    byte: each blob is mounted (DESIGN section 6: HEAD, then mount, then upload)."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/staging")
    fault_proxy.clear()
    cli("mirror", "-c", cat, "--from", f"{fault_proxy.host}/staging", "--to", f"{fault_proxy.host}/prod")
    assert _uploads(fault_proxy) == 0 and fault_proxy.count("GET", r"/blobs/") == 0
    assert fault_proxy.count("POST", r"/v2/prod/tiny/blobs/uploads/\?mount=sha256:\w+&from=staging/tiny") >= 4
    digest = _lock(cat)["tiny"]["image"]["digest"]
    cli("verify", "-c", cat, "--from", f"{fault_proxy.host}/prod")
    assert digest_of(_skopeo_raw(f"{fault_proxy.host}/prod/tiny@{digest}")) == digest


def test_a_push_or_mirror_to_a_second_prefix_mounts_from_where_the_lock_says(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The lock records where the image was pushed: a push from the layout, or a mirror from an
    archive, to another prefix of that registry mounts each blob from there, sending no byte."""
    cat = _catalog(tmp_path)
    run = tmp_path.name  # prefixes of this test's own, in the session's registry
    cli("build", "-c", cat)
    cli("push", "-c", cat, "--registry", f"{fault_proxy.host}/{run}/staging")
    cli("mirror", "-c", cat, "--to", f"oci-archive:{tmp_path / 'a.tar'}")
    for to, how in (
        ("prod", ["push", "--registry", f"{fault_proxy.host}/{run}/prod"]),  # from the layout; the lock: staging
        ("edge", ["mirror", "--from", f"oci-archive:{tmp_path / 'a.tar'}", "--to", f"{fault_proxy.host}/{run}/edge"]),
    ):
        fault_proxy.clear()
        cli(*how, "-c", cat)
        assert _uploads(fault_proxy) == 0, to
        mounts = rf"/v2/{run}/{to}/tiny/blobs/uploads/\?mount=sha256:\w+&from={run}/(staging|prod)/tiny"
        assert fault_proxy.count("POST", mounts) >= 4
        digest = _lock(cat)["tiny"]["image"]["digest"]
        assert digest_of(_skopeo_raw(f"{fault_proxy.host}/{run}/{to}/tiny@{digest}")) == digest


def test_inspect_gives_every_file_s_size_reading_no_weight(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A weight layer's own size rounds its file's up to 512 bytes: the size comes from the tar
    header in front of the file, so inspect reads a layer's first bytes, not its gigabytes."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/{tmp_path.name}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    locked = {f["path"]: f["size"] for f in _lock(cat)["tiny"]["files"]}
    ref = f"{prefix}/tiny@{_lock(cat)['tiny']['image']['digest']}"
    fault_proxy.cut("GET", r"/blobs/", after_bytes=256 << 10, times=100)  # a weight read through would fail
    info = json.loads(cli("inspect", "--json", ref).stdout)
    assert {f["path"]: f["size"] for f in info["files"]} == locked
    assert fault_proxy.count("GET", r"/blobs/") == 2  # the small files' layer, and the weight's header
    weight = next(f for f in info["files"] if f["path"] == "model.safetensors")["layer"]
    # asked for with a Range request, so the registry sends the header and no more
    (asked,) = [e for e in fault_proxy.exchanges if e.path.endswith(f"/blobs/{weight}")]
    assert asked.range == "bytes=0-65535" and asked.status == 206 and asked.response_bytes == 64 << 10
    fault_proxy.clear()
    fault_proxy.unrange("GET", rf"/blobs/{weight}")  # a registry that ignores Range: cut off all the same
    info = json.loads(cli("inspect", "--json", ref).stdout)
    assert {f["path"]: f["size"] for f in info["files"]} == locked
    (asked,) = [e for e in fault_proxy.exchanges if e.path.endswith(f"/blobs/{weight}")]
    assert asked.status == 200 and asked.range == "bytes=0-65535"
    fault_proxy.clear()
    fault_proxy.restatus("GET", rf"/blobs/{weight}", 503, times=100)  # an outage is no unknown size: it fails
    assert "HTTP 503" in cli("inspect", "--max-retries", "0", ref, code=1).stderr
    fault_proxy.clear()
    fault_proxy.restatus("GET", rf"/blobs/{weight}", 404, times=100)  # a blob gone: shown, its size unknown
    result = cli("inspect", "--json", ref)
    assert {f["path"]: f["size"] for f in json.loads(result.stdout)["files"]} == locked | {"model.safetensors": None}
    assert f"layer {weight}: its file's size is unknown: " in result.stderr
    fault_proxy.clear()
    cli("mirror", "-c", cat, "--to", f"oci:{tmp_path / 'oci'}")
    info = json.loads(cli("inspect", "--json", f"oci:{tmp_path / 'oci'}:tiny").stdout)
    assert {f["path"]: f["size"] for f in info["files"]} == locked
    cli("mirror", "-c", cat, "--to", f"oci-archive:{tmp_path / 'a.tar'}")
    info = json.loads(cli("inspect", "--json", f"oci-archive:{tmp_path / 'a.tar'}:tiny").stdout)
    assert {f["path"]: f["size"] for f in info["files"]} == locked
    assert "  file model.safetensors  16.0 MiB\n" in cli("inspect", ref).stdout
    # a weight blob damaged, then gone: inspect still shows the image (verify says what is wrong)
    blob = tmp_path / "oci" / "blobs" / "sha256" / weight.removeprefix("sha256:")
    blob.write_bytes(b"\xff" * blob.stat().st_size)
    for damage in ("damaged", "gone"):
        info = json.loads(cli("inspect", "--json", f"oci:{tmp_path / 'oci'}:tiny").stdout)
        sizes = {f["path"]: f["size"] for f in info["files"]}
        assert sizes == locked | {"model.safetensors": None}, damage
        blob.unlink(missing_ok=True)


def test_no_bytes_of_a_blob_are_asked_for_with_no_range(fault_proxy: FaultProxy) -> None:
    """A foreign manifest's empty one-file layer: `Range: bytes=0--1` is no range (HTTP 416)."""
    from modelcar.stores.registry import RegistryStore

    assert RegistryStore(f"{fault_proxy.host}/x").blob_head("x/m", "sha256:" + "0" * 64, 0) == b""
    assert fault_proxy.count("GET") == 0


def test_inspect_asks_for_the_weight_headers_together(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A model of hundreds of shards on a far registry cost inspect a round trip per shard, one
    after another: with every weight's GET held by the proxy, all three are asked for at once."""
    from modelcar.describe import describe_image
    from modelcar.image import LARGE_FILE
    from modelcar.stores.registry import RegistryStore

    shards = {f"model-0000{i}-of-00003.safetensors": bytes([i]) * LARGE_FILE for i in (1, 2, 3)}
    _model(tmp_path / "m", {"config.json": b"{}", **shards})
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: sharded\n    path: ./m\n")
    prefix = f"{fault_proxy.host}/{tmp_path.name}"
    built = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]
    digest, weights = built["digest"], [layer["digest"] for layer in built["layers"] if layer["files"][0] in shards]
    assert len(weights) == 3
    fault_proxy.clear()
    fault_proxy.stall("GET", f"/blobs/({'|'.join(weights)})", seconds=60, times=100)
    described: dict[str, Any] = {}
    store = RegistryStore(prefix)
    repo = store.image_name("sharded")
    held = _held_at_once(fault_proxy, 3, lambda: described.update(describe_image(store, repo, digest)))
    assert held == 3, f"{held} weight header(s) asked for at once"
    assert {f["path"]: f["size"] for f in described["files"]} == {"config.json": 2} | {p: LARGE_FILE for p in shards}


def test_a_blob_the_registry_serves_from_elsewhere_is_found_and_read(
    registry: Registry, fault_proxy: FaultProxy
) -> None:
    """Registries on object storage answer a blob request with a redirect to a signed URL on
    another host (a CDN, S3). That URL is made for one GET: a HEAD sent there is refused, and it
    may expire before it is used; neither is the user's access being denied."""
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import RegistryError

    cdn = FaultProxy(registry.url).start()
    try:
        blob = os.urandom(300_000)
        digest = digest_of(blob)
        RegistryStore(f"{fault_proxy.host}/cdn", write=True).put_blob("cdn/x", len(blob), lambda: [blob], digest)
        signed = f"{cdn.url}/v2/cdn/x/blobs/{digest}?X-Amz-Signature=ab%2Bcd"
        fault_proxy.fail(None, f"/v2/cdn/x/blobs/{digest}$", 307, headers={"Location": signed}, times=100)
        cdn.fail("HEAD", "", 403, times=100)  # signed for a GET
        cdn.fail("GET", "", 403, times=1)  # expired on the way: the registry's next redirect works
        store = RegistryStore(f"{fault_proxy.host}/cdn")  # knows nothing of the blob yet
        assert store.has_blob("cdn/x", digest, len(blob))
        assert cdn.count("HEAD") == 0
        assert b"".join(store.open_blob("cdn/x", digest)) == blob
        assert cdn.count("GET", r"X-Amz-Signature=ab%2Bcd$") == 2
        # a redirect within the registry is followed: where it leads says whether the blob is there
        missing = "sha256:" + "0" * 64
        moved = f"{fault_proxy.url}/v2/cdn/x/blobs/{missing}"
        fault_proxy.fail("HEAD", f"/v2/cdn/y/blobs/{digest}$", 307, headers={"Location": moved}, times=1)
        assert not store.has_blob("cdn/y", digest, len(blob))
        cdn.fail("GET", "", 403, times=100)  # refused for good: said of that host
        with pytest.raises(RegistryError, match=rf"sent it on to {cdn.url}, which refused it \(HTTP 403\)") as e:
            b"".join(store.open_blob("cdn/x", digest))
        assert "denied" not in str(e.value)
    finally:
        cdn.stop()


def test_a_registry_that_refuses_an_oci_manifest_type_says_which(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    invalid = b'{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid"}]}'
    fault_proxy.fail("PUT", r"/manifests/", 400, body=invalid, times=1000)
    result = cli("build", "-c", _catalog(tmp_path), "--push", "--registry", f"{fault_proxy.host}/old", code=1)
    assert "MANIFEST_INVALID: manifest invalid: the registry refused the application/vnd.oci.image." in result.stderr
    assert "use another registry or a newer version of it" in result.stderr


def test_a_catalog_moved_to_another_prefix_of_the_registry_mounts_its_layers(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A registry prefix changed in the catalog (same registry): every layer went up again (140 GB
    for a 70B model), though the lock names the repository that holds them all."""
    cat = _catalog(tmp_path)
    text = cat.read_text()
    write_catalog(cat, f"registry: {fault_proxy.host}/old\n" + text)
    cli("build", "-c", cat, "--push")
    write_catalog(cat, f"registry: {fault_proxy.host}/new\n" + text)
    fault_proxy.clear()
    cli("build", "-c", cat, "--push")
    sent = sum(e.request_bytes for e in fault_proxy.exchanges if e.method in ("PUT", "PATCH"))
    assert sent < 64 * 1024, sent  # configs and manifests; no layer
    # both layers, and both platforms' configs
    assert fault_proxy.count("POST", r"/v2/new/tiny/blobs/uploads/\?mount=sha256:\w+&from=old/tiny") == 4
    lock = _lock(cat)["tiny"]["image"]
    assert lock["repository"] == f"{fault_proxy.host}/new/tiny"
    cli("verify", "-c", cat, "--from", f"{fault_proxy.host}/new")

    # a repository that lost a layer: the mount is refused (an upload session instead), the layer is sent
    links = registry.root / "docker" / "registry" / "v2" / "repositories" / "new" / "tiny" / "_layers" / "sha256"
    for link in links.iterdir():
        shutil.rmtree(link)
    write_catalog(cat, f"registry: {fault_proxy.host}/newer\n" + text)
    fault_proxy.clear()
    cli("build", "-c", cat, "--push")
    sent = sum(e.request_bytes for e in fault_proxy.exchanges if e.method in ("PUT", "PATCH"))
    assert sent > len(BIG)
    assert fault_proxy.count("DELETE", r"/v2/newer/tiny/blobs/uploads/") >= 1  # the sessions not used, closed
    cli("verify", "-c", cat, "--from", f"{fault_proxy.host}/newer")


def test_a_registry_that_is_down_is_not_asked_again_for_every_request(cli: Cli, tmp_path: Path) -> None:
    """Nothing listening at the registry: every request of every model was retried in turn, and a
    push took minutes, looking hung. Once one call gave up without ever connecting, the others of
    the run fail at once, saying why."""
    from tests.registry import free_port

    models = "".join(f"  - name: {n}\n    path: ./m\n" for n in ("a", "b", "c"))
    cat = _catalog(tmp_path, models)
    down = f"127.0.0.1:{free_port()}"
    result = cli("build", "-c", cat, "--push", "--registry", f"{down}/x", "--max-retries", "2", code=1)
    retried = [line for line in result.stderr.splitlines() if "; retry " in line]
    assert retried and all("x/a: " in line for line in retried), retried  # the first model's calls only
    for model in ("b", "c"):
        assert f"error: {model}: {down}: x/{model}: " in result.stderr
    assert result.stderr.count(f"not tried: the registry {down} could not be reached earlier in this run") == 2


def test_an_archive_older_than_the_lock_says_so_not_blob_not_found(cli: Cli, tmp_path: Path) -> None:
    """The air gap's archive was written before the lock's pin moved: mirroring from it said
    `blob sha256:... not found`, as if it were damaged."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    archive = f"oci-archive:{tmp_path / 'air.tar'}"
    cli("mirror", "-c", cat, "--to", archive)
    (tmp_path / "m" / "config.json").write_text('{"changed": true}')
    cli("lock", "-c", cat, "--update")
    cli("build", "-c", cat)
    digest = _lock(cat)["tiny"]["image"]["digest"]
    result = cli("mirror", "-c", cat, "--from", archive, "--to", f"oci:{tmp_path / 'site'}", code=1)
    assert f"{archive}: does not hold tiny's locked image {digest} (written before the lock's pin moved?)" in (
        result.stderr
    )
    assert f"`modelcar mirror tiny --to {archive} -c" in result.stderr  # the CLI names the catalog it was given


def test_a_store_sending_more_than_a_blob_or_a_manifest_is_cut_off(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A hostile or broken server's endless body: a mirror into a layout filled the disk (the size
    was compared only at the end), and a manifest was read into memory without a limit."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    big = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    size = big.stat().st_size
    with big.open("ab") as f:  # the source store holds more than the manifest says
        f.write(b"\0" * (1 << 20))
    result = cli("mirror", "-c", cat, "--from", f"oci:{layout}", "--to", f"oci:{tmp_path / 'out'}", code=1)
    assert f"blob sha256:{big.name}: more than its {size} bytes: refused" in result.stderr
    assert not list((tmp_path / "out").rglob(big.name))

    fault_proxy.fail("GET", r"/manifests/", 200, body=b" " * (5 << 20), times=10)
    result = cli("inspect", f"{fault_proxy.host}/x/tiny:latest", code=1)
    assert "GET manifest latest: larger than 4194304 bytes: not a manifest" in result.stderr


def test_a_manifest_by_digest_is_fetched_once_but_a_failure_is_not_kept(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    from modelcar.errors import ModelcarError
    from modelcar.stores.registry import RegistryStore

    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/once"
    digest = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]["digest"]
    fault_proxy.clear()
    fault_proxy.fail("GET", r"/manifests/sha256:", 404, times=1)
    with RegistryStore(prefix) as store:
        with pytest.raises(ModelcarError, match="not found"):
            store.get_manifest("once/tiny", digest)
        first = store.get_manifest("once/tiny", digest)  # asked again: the failure was not kept
        assert store.get_manifest("once/tiny", digest) == first
    assert fault_proxy.count("GET", r"/manifests/sha256:") == 2
    assert "sha256:" + hashlib.sha256(first).hexdigest() == digest


def _held_at_once(proxy: FaultProxy, want: int, work: Callable[[], object]) -> int:
    """Run `work` in a thread while the proxy holds the requests its stall rule matches: how many
    were held at once (waiting up to 30 s for `want` of them). An error of `work` is raised here."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while len(proxy.stalled()) < want and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        held = len(proxy.stalled())
    finally:
        proxy.release()
        worker.join(60)
    if errors:
        raise errors[0]
    return held


def _rebuild_held(proxy: FaultProxy, cat: Path, prefix: str, want: int) -> tuple[int, list[str | None]]:
    """Rebuild the catalog into `prefix` while the proxy holds the requests a stall rule matches:
    how many were held at once (waiting up to 30 s for `want` of them), and the images' digests."""
    from modelcar.build import build_models
    from modelcar.catalog import load_catalog
    from modelcar.stores.registry import RegistryStore

    results: list[str | None] = []

    def rebuild() -> None:
        with RegistryStore(prefix, write=True) as store:
            results.extend(r.digest for r in build_models(load_catalog(cat), store=store))

    return _held_at_once(proxy, want, rebuild), results


def test_verify_reads_models_and_blobs_several_at_a_time(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """200 models through a registry 30 ms away took verify 600 round trips one after another:
    with every blob GET held by the proxy, several are asked for before any is answered."""
    from modelcar.catalog import load_catalog
    from modelcar.stores.layout import LayoutStore
    from modelcar.stores.registry import RegistryStore
    from modelcar.stores.registry_client import RegistryOptions
    from modelcar.verify import verify_models

    cat = _catalog(tmp_path, "  - name: one\n    path: ./m\n  - name: two\n    path: ./m\n")
    prefix = f"{fault_proxy.host}/many"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    fault_proxy.clear()
    fault_proxy.stall("GET", r"/blobs/sha256:", seconds=60, times=100)
    report: dict[str, Any] = {}

    def verify() -> None:
        options = RegistryOptions.create()
        source = RegistryStore(prefix, options)
        report.update(
            verify_models(load_catalog(cat), None, source=source, layout=LayoutStore(tmp_path / "l"), options=options)
        )

    assert _held_at_once(fault_proxy, 4, verify) == 4  # the configs or layers of both models, 4 at a time (--jobs)
    assert {name: v.problems for name, v in report.items()} == {"one": [], "two": []}


def test_a_push_asks_about_every_model_s_image_at_once(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A push that finds 40 models there took their round trips one model after another (4.5 s
    with the registry 30 ms away): every model's names are asked about before any is answered."""
    from modelcar import api

    models = "".join(f"  - name: m{i}\n    path: ./m\n" for i in range(3))
    cat = _catalog(tmp_path, models)
    prefix = f"{fault_proxy.host}/{tmp_path.name}"
    cli("build", "-c", cat)
    cli("push", "-c", cat, "--registry", prefix)
    fault_proxy.clear()
    fault_proxy.stall("HEAD", r"/manifests/(?!sha256:)", seconds=60, times=100)  # each model's commit tag
    pushed: list[str] = []
    assert _held_at_once(fault_proxy, 3, lambda: pushed.extend(r.name for r in api.push(cat, registry=prefix))) == 3
    assert pushed == ["m0", "m1", "m2"] and _uploads(fault_proxy) == 0


def test_a_rebuilds_registry_lookups_are_in_flight_together(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A far registry costs a rebuild its round trips one after another unless they overlap: with
    every request by tag held by the proxy, the earlier image's tags (its commit's and `stable`)
    are both asked for before either is answered."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/overlap"
    first = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]
    assert len(first["layers"]) == 2

    fault_proxy.clear()
    fault_proxy.stall("HEAD", r"/manifests/(?!sha256:)", seconds=60, times=100)  # by tag
    held, results = _rebuild_held(fault_proxy, cat, prefix, 2)
    assert held >= 2, f"{held} lookup(s) in flight at once: the rebuild asks one at a time"
    assert results == [first["digest"]]
    assert _uploads(fault_proxy) == 0
    assert fault_proxy.count("HEAD", r"/blobs/") == 0  # the image read names every blob


def test_a_blob_is_asked_about_once_and_a_small_one_not_at_all(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Round trips a push need not make: a blob whose digest is known only on the way up cannot be
    asked about; one found absent is not asked about again before its upload; a config or a
    small-files layer costs less to send than to ask about."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/first")
    assert fault_proxy.count("HEAD", r"/blobs/") == 0
    assert _uploads(fault_proxy) > 0

    cli("build", "-c", cat)  # into the layout: every layer's digest is now in the layer cache
    lock = yaml.safe_load(cat.with_suffix(".lock").read_text())
    del lock["models"]["tiny"]["image"]["repository"]  # the blobs in first/ would be mounted, not asked about
    cat.with_suffix(".lock").write_text(yaml.safe_dump(lock))
    fault_proxy.clear()
    result = cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/second", "--json")
    (model,) = json.loads(result.stdout)["models"]
    asked = [p.rsplit("/", 1)[1] for m, p in fault_proxy.requests if m == "HEAD" and "/blobs/" in p]
    layers = {layer["digest"]: layer["size"] for layer in model["layers"]}
    assert sorted(asked) == sorted(layers)  # each layer once (is it there to reuse?), no config
    uploaded = [p for m, p in fault_proxy.requests if m == "PUT" and "/blobs/uploads/" in p]
    assert len(uploaded) == 2 + 2  # both layers and both platforms' configs, nothing twice
    raw = _skopeo_raw(f"{fault_proxy.host}/second/tiny@{model['digest']}")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == model["digest"]


def test_a_new_small_file_goes_up_beside_the_configs(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A new commit that changes only small files: every layer's digest can be known before any
    upload (the weights' from the earlier image, the small files' hashed first), so the small
    layer goes up in one request and the configs beside it, not after it."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/beside"
    first = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]
    (tmp_path / "m" / "config.json").write_bytes(b'{"model_type": "qwen3"}\n')
    cli("lock", "-c", cat, "--update")
    fault_proxy.clear()
    fault_proxy.stall("PUT", r"/blobs/uploads/", seconds=60, times=100)
    held, results = _rebuild_held(fault_proxy, cat, prefix, 3)
    assert held == 3, f"{held} upload(s) in flight at once: the configs wait for the layer"
    assert results and results[0] != first["digest"]
    assert fault_proxy.count("PATCH", r"/blobs/uploads/") == 0  # the layer's digest was known: one PUT
    assert fault_proxy.count("HEAD", r"/blobs/") == 0
    raw = _skopeo_raw(f"{prefix}/tiny@{results[0]}")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == results[0]


def test_an_update_looks_up_the_earlier_image_while_the_hub_is_asked(
    cli: Cli, fake_hub: FakeHub, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """`build --update` needs the new commit from the Hub and the earlier image from the registry;
    neither depends on the other, so a far Hub and a far registry cost their round trips once, side
    by side: the Hub client is made while the registry's answer about the earlier image is on its way."""
    from modelcar.build import build_models
    from modelcar.catalog import load_catalog
    from modelcar.hub import Hub
    from modelcar.stores.registry import RegistryStore

    files = {"config.json": b'{"model_type": "llama"}\n', "model.safetensors": BIG}
    fake_hub.add_repo("org/side", files)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: side\n    hf: org/side\n")
    prefix = f"{fault_proxy.host}/side"
    first = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]
    fake_hub.add_repo("org/side", {**files, "config.json": b'{"model_type": "qwen3"}\n'})
    fault_proxy.clear()
    fault_proxy.stall("GET", r"/manifests/", seconds=10)  # the registry's first answer waits for the Hub
    in_flight: list[int] = []

    def hub() -> Hub:
        deadline = time.monotonic() + 10
        while not fault_proxy.stalled() and time.monotonic() < deadline:
            time.sleep(0.01)
        in_flight.append(len(fault_proxy.stalled()))
        fault_proxy.release()
        return Hub()

    with RegistryStore(prefix, write=True) as store:
        (result,) = build_models(load_catalog(cat), store=store, update=True, hub=hub)
    assert in_flight == [1], "the Hub was asked only once the earlier image had been looked up"
    assert result.digest != first["digest"]
    reused = {m.path: layer.reused for layer in result.layers for m in layer.plan.members}
    assert reused == {"model.safetensors": True, "config.json": False}  # the weights' layer, by annotation
    assert fault_proxy.count("PUT", r"/blobs/uploads/") >= 1  # the new config.json layer went up


HUB_FILES = {"config.json": b'{"model_type": "llama"}\n', "model.safetensors": BIG}


def _pushed_from_the_hub(
    cli: Cli, fake_hub: FakeHub, registry: Registry, tmp_path: Path, name: str, keys: str = ""
) -> tuple[Path, str, str]:
    """org/tiny (a config and a weights file; `keys`: more of its catalog entry) built and pushed
    under a new prefix: (catalog, prefix, the image's digest)."""
    fake_hub.add_repo("org/tiny", HUB_FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", f"models:\n  - name: tiny\n    hf: org/tiny\n{keys}")
    prefix = f"{registry.host}/{registry.unique_repo(name)}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    return cat, prefix, _lock(cat)["tiny"]["image"]["digest"]


def test_a_tag_someone_else_pushed_teaches_no_layer(
    cli: Cli, fake_hub: FakeHub, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can push to the repository moved `stable` to an image whose weights layer carries the
    real layer's key annotation over other bytes of the same size. A build of the next commit on a
    fresh runner took the key from it, reused those bytes, and the lock pinned them: layers are
    reused only from the image the lock names by digest (the one the pin replaced, kept as
    `earlier` by `lock --update`)."""
    from modelcar.image import MEDIA_MANIFEST
    from modelcar.stores.registry import RegistryStore

    cat, prefix, first = _pushed_from_the_hub(cli, fake_hub, registry, tmp_path, "poison", "    tags: [stable]\n")
    repo = prefix.split("/", 1)[1] + "/tiny"
    with RegistryStore(prefix, write=True) as store:
        index = json.loads(store.get_manifest(repo, first))
        manifest = json.loads(store.get_manifest(repo, index["manifests"][0]["digest"]))
        weights = max(manifest["layers"], key=lambda layer: layer["size"])
        bad = bytes(weights["size"])  # a layer of the same size, other bytes
        weights["digest"] = store.put_blob(repo, len(bad), lambda: [bad])
    forged = json.dumps(manifest).encode()
    fake_hub.add_repo("org/tiny", {**HUB_FILES, "config.json": b'{"model_type": "qwen3"}\n'})
    cli("lock", "-c", cat, "--update")
    assert _lock(cat)["tiny"]["earlier"] == {"digest": first, "repository": prefix + "/tiny"}
    pinned = cat.with_suffix(".lock").read_text()
    # a lock from before `earlier` (or one edited by hand): the tags are all a build finds
    bare = re.sub(r"\n    earlier:\n(      .*\n)+", "\n", pinned)
    assert "earlier" not in bare and bare != pinned
    for attempt, (text, reused) in enumerate(((pinned, 1), (bare, 0))):  # each time a fresh runner
        with RegistryStore(prefix, write=True) as store:
            store.put_manifest(repo, forged, MEDIA_MANIFEST, ref="stable")
        cat.with_suffix(".lock").write_text(text)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / f"hf-{attempt}"))
        monkeypatch.setenv("MODELCAR_CACHE", str(tmp_path / f"layers-{attempt}"))
        built = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]
        assert weights["digest"] not in [layer["digest"] for layer in built["layers"]]
        assert built["layersReused"] == reused  # with `earlier`: the real weights layer, from `first`
        assert cli("verify", "-c", cat, "--from", prefix).stdout == "tiny  ok\n"
        entry = _lock(cat)["tiny"]
        assert entry["image"]["digest"] == built["digest"] and "earlier" not in entry


def test_a_layout_build_between_the_pin_and_the_push_keeps_the_layers_to_reuse(
    cli: Cli, fake_hub: FakeHub, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lock --update`, a build into a developer's layout, the lock committed, then `build --push` on
    a fresh CI runner: the layout's image is in no registry, and the pushed one it replaced was
    forgotten, so every layer went up again. `earlier` stays until the entry's image is pushed."""
    cat, prefix, first = _pushed_from_the_hub(cli, fake_hub, registry, tmp_path, "devfirst")
    fake_hub.add_repo("org/tiny", {**HUB_FILES, "config.json": b'{"model_type": "qwen3"}\n'})
    cli("lock", "-c", cat, "--update")
    cli("build", "-c", cat)  # into the layout
    entry = _lock(cat)["tiny"]
    assert "repository" not in entry["image"] and entry["earlier"] == {"digest": first, "repository": prefix + "/tiny"}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "runner-hf"))
    monkeypatch.setenv("MODELCAR_CACHE", str(tmp_path / "runner-layers"))
    shutil.rmtree(tmp_path / ".modelcar")
    fake_hub.requests.clear()
    built = json.loads(cli("build", "-c", cat, "--push", "--registry", prefix, "--json").stdout)["models"][0]
    assert built["layersReused"] == 1  # the weights' layer, from the image `earlier` names
    assert not [p for m, p in fake_hub.requests if m == "GET" and p.endswith(".safetensors")]
    assert "earlier" not in _lock(cat)["tiny"]  # pushed: its own image is the one to reuse from now


def test_an_answer_encoded_though_none_was_asked_for_is_refused(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Answers are asked for as they are (`Accept-Encoding: identity`): one a server encodes anyway
    is refused before a byte of it is decoded (5 KB of nested gzip took 3 GiB of memory to decode,
    then a MemoryError)."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/encoded"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    good = cli("inspect", f"{prefix}/tiny:stable", "--json").stdout
    fault_proxy.fail(
        "GET", r"/manifests/", 200, headers={"Content-Encoding": "gzip, gzip"}, body=gzip.compress(gzip.compress(b"{}"))
    )
    error = json.loads(cli("inspect", f"{prefix}/tiny:stable", "--json", code=1).stdout)["error"]
    assert "the answer came with Content-Encoding: gzip, gzip, where none was asked for" in error
    assert cli("inspect", f"{prefix}/tiny:stable", "--json").stdout == good


def test_a_registry_that_trickles_is_given_up_within_the_deadline(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A byte every tenth of a second never trips a read timeout: `inspect --retry-deadline 10` was
    still waiting after 90 s. A transfer that moves almost nothing for min(60 s, the deadline) stalls."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/trickle"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    fault_proxy.trickle("GET", r"/manifests/", rate=10)
    args = ["--retry-deadline", "2", "--max-retries", "0", "--json"]
    error = json.loads(cli("inspect", f"{prefix}/tiny:stable", *args, code=1).stdout)["error"]
    assert "the transfer stalled: " in error and " bytes in 2 s" in error, error
    # a blob: retried as a dropped transfer is, until the deadline
    fault_proxy.trickle("GET", r"/blobs/sha256:", rate=10, times=100)
    problems = json.loads(cli("verify", "-c", cat, "--from", prefix, *args, code=1).stdout)["models"][0]["problems"]
    assert problems and all("the transfer stalled" in p for p in problems), problems


def test_what_a_store_says_cannot_steer_the_terminal(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A registry's error message and an image's annotations are printed for a person: an escape
    sequence in them (clear the screen, retitle the window) went to the terminal as it was."""
    from modelcar.image import MEDIA_MANIFEST
    from modelcar.stores.layout import LayoutStore

    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = LayoutStore(tmp_path / ".modelcar" / "oci")
    index = json.loads(layout.get_manifest("tiny", "tiny"))
    manifest = json.loads(layout.get_manifest("tiny", index["manifests"][0]["digest"]))
    manifest["annotations"] = {"org.opencontainers.image.title": "\x1b]0;owned\x07\x1b[2J"}
    layout.put_manifest("tiny", json.dumps(manifest).encode(), MEDIA_MANIFEST, ref="evil")
    shown = cli("inspect", f"oci:{layout.root}:evil").stdout
    assert "org.opencontainers.image.title: \\x1b]0;owned\\x07\\x1b[2J" in shown and "\x1b" not in shown
    message = b'{"errors":[{"code":"MANIFEST_INVALID","message":"\\u001b[2Jgo away"}]}'
    fault_proxy.fail("GET", r"/manifests/", 400, body=message)
    result = cli("inspect", f"{fault_proxy.host}/x/tiny:stable", code=1)
    assert "\\x1b[2Jgo away" in result.stderr and "\x1b" not in result.stderr


def test_a_slow_reader_is_no_stalled_transfer() -> None:
    """The stall rule counts the wait for the next piece, not what the reader does between pieces
    (a blob hashed on a slow disk while the transfer paused took a mirror for a stalled one)."""
    from modelcar.stall import STALL_BYTES, paced

    def server(pause: float) -> Iterator[bytes]:
        for _ in range(3):
            time.sleep(pause)
            yield b"x"

    read = []
    for chunk in paced(server(0), window=0.05):
        time.sleep(0.05)  # the reader's own time
        read.append(chunk)
    assert read == [b"x"] * 3
    with pytest.raises(TimeoutError, match=r"the transfer stalled: \d+ bytes in "):
        list(paced(server(0.05), window=0.05))
    assert len(b"".join(paced(iter([bytes(STALL_BYTES)] * 3), window=0))) == 3 * STALL_BYTES


UNKNOWN = b'{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}'


def test_a_manifest_answered_blob_unknown_is_put_again_then_fails(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Just-stored blobs reported unknown (a registry catching up, or a second writer re-linking the
    same blob) are asked about again; a blob that stays unknown still fails the push."""
    cat = _catalog(tmp_path)
    settling = fault_proxy.fail("PUT", r"/manifests/", 400, body=UNKNOWN, times=2)
    result = cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/settle", "--json")
    digest = json.loads(result.stdout)["models"][0]["digest"]
    assert settling.hits == 2
    raw = _skopeo_raw(f"{fault_proxy.host}/settle/tiny@{digest}")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest

    missing = fault_proxy.fail("PUT", r"/manifests/", 400, body=UNKNOWN, times=100)
    result = cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/missing", code=1)
    assert "MANIFEST_BLOB_UNKNOWN: blob unknown to registry" in result.stderr
    assert missing.hits % 4 == 0  # each manifest asked four times, then given up


def test_a_wrong_cached_digest_is_caught_before_the_registry_keeps_it(
    cli: Cli, registry: Registry, tmp_path: Path
) -> None:
    """A push into a new repository streams layers under the digests the layer cache knows; a wrong
    one fails our own check of the stream (the registry stores nothing under it) and the layer is
    made again with every file checked."""
    cat = _catalog(tmp_path)
    first = f"{registry.host}/{registry.unique_repo('first')}"
    digest = json.loads(cli("build", "-c", cat, "--push", "--registry", first, "--json").stdout)["models"][0]["digest"]
    for p in (tmp_path / "modelcar-cache" / "layers").iterdir():
        p.write_text(f"sha256:{'0' * 64} {p.read_text().split()[1]}\n")
    second = f"{registry.host}/{registry.unique_repo('second')}"
    result = cli("build", "-c", cat, "--push", "--registry", second, "--json")
    assert json.loads(result.stdout)["models"][0]["digest"] == digest
    assert "not the cached layer sha256:0000" in result.stderr
    raw = _skopeo_raw(f"{second}/tiny@{digest}")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    assert cli("verify", "-c", cat, "--from", second).stdout == "tiny  ok\n"


def test_push_from_layout_and_max_layer_size(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    digest = _lock(cat)["tiny"]["image"]["digest"]
    prefix = f"{registry.host}/{registry.unique_repo('pushed')}"
    result = cli("push", "-c", cat, "--registry", prefix)
    assert f"{digest}  oci:" in result.stdout
    assert "sha256:" + hashlib.sha256(_skopeo_raw(f"{prefix}/tiny:stable")).hexdigest() == digest
    assert _lock(cat)["tiny"]["image"]["repository"] == f"{prefix}/tiny"

    other = f"{registry.host}/{registry.unique_repo('limited')}"
    result = cli("push", "-c", cat, "--registry", other, "--max-layer-size", "1000000", code=2)
    refused = r"model.safetensors is \d+ bytes \(16.0 MiB\), over the 1000000-byte \(976.6 KiB\) layer limit"
    assert re.search(refused, result.stderr), result.stderr
    result = cli("build", "-c", cat, "--push", "--registry", other, "--max-layer-size", "1000000", code=2)
    assert re.search(refused, result.stderr), result.stderr
    code, _, _ = registry.request("GET", f"/v2/{other.split('/', 1)[1]}/tiny/tags/list")
    assert code == 404  # refused before anything was uploaded


def test_a_model_the_registry_refuses_before_the_build_does_not_stop_the_others(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A layer over the limit, or a repository the registry refuses, is found before anything is
    downloaded or built: that model fails, the others are built and pushed (as `push` does)."""
    _model(tmp_path / "s", {"config.json": b"{}" * 1500, "tokenizer.json": b"[]" * 1500})
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n  - name: small\n    path: ./s\n")
    prefix = f"{registry.host}/{registry.unique_repo('limited')}"
    result = cli("build", "-c", cat, "--push", "--registry", prefix, "--max-layer-size", "1000000", "--json", code=2)
    doc = json.loads(result.stdout)
    models = {m["name"]: m for m in doc["models"]}
    assert doc["error"].startswith("tiny: layer model.safetensors is ")  # the model named once
    assert models["small"]["error"] is None and models["small"]["digest"]
    assert re.search(r"tiny: layer model.safetensors is \d+ bytes", models["tiny"]["error"])
    assert "tiny" not in _lock(cat) or "image" not in _lock(cat)["tiny"]
    assert _lock(cat)["small"]["image"]["digest"] == models["small"]["digest"]
    code, _, _ = registry.request("GET", f"/v2/{prefix.split('/', 1)[1]}/tiny/tags/list")
    assert code == 404  # refused before anything of it was uploaded

    # a layer of several small files is named as such, not left blank
    result = cli("build", "-c", cat, "--push", "--registry", prefix, "--max-layer-size", "5000", "small", code=2)
    assert re.search(r"small: layer 2 small files is \d+ bytes", result.stderr), result.stderr

    # a repository this user may not push to
    denied = registry.unique_repo("denied")
    fault_proxy.fail(None, f"^/v2/{denied}/tiny/", 403, times=1000)
    result = cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/{denied}", "--json", code=1)
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert models["small"]["error"] is None and "tiny: start upload: anonymous is denied" in models["tiny"]["error"]
    assert _lock(cat)["small"]["image"]["repository"] == f"{fault_proxy.host}/{denied}/small"


def test_a_push_or_mirror_that_finds_the_image_there_asks_and_writes_nothing(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A second push (or mirror) of what the registry holds rewrote every manifest and tag, one
    request after another, after reading the whole image at the source: 40 models took 14 s with
    the registry 30 ms away. Now each name, platform manifest and blob is asked about (HEADs, all
    at once), and that is all; what a clean-up deleted under a tag is put back all the same."""

    def asked(since: int) -> list[tuple[str, str]]:  # but the client's first ping of /v2/
        return [(e.method, e.path.rsplit("/", 1)[-1]) for e in fault_proxy.exchanges[since:] if e.path != "/v2/"]

    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    repo = tmp_path.name
    prefix = f"{fault_proxy.host}/{repo}"
    cli("push", "-c", cat, "--registry", prefix)
    # a first push asks one name (the commit's tag, not there), not each of them
    assert fault_proxy.count("HEAD", r"/manifests/(?!sha256:)") == 1
    n = len(fault_proxy.exchanges)
    result = cli("push", "-c", cat, "--registry", prefix, "--json")
    commit, digest = _lock(cat)["tiny"]["commit"][:12], _lock(cat)["tiny"]["image"]["digest"]
    assert {method for method, _ in asked(n)} == {"HEAD"}, asked(n)
    assert ("HEAD", commit) in asked(n) and ("HEAD", "stable") in asked(n)
    assert json.loads(result.stdout)["models"][0]["digest"] == digest
    assert f"tiny: {digest} already in {prefix}/tiny" in result.stderr

    # registry -> layout, the layout holding it: the registry is not asked at all
    dest = tmp_path / "mirror"
    cli("mirror", "-c", cat, "--from", prefix, "--to", f"oci:{dest}")
    n = len(fault_proxy.exchanges)
    cli("mirror", "-c", cat, "--from", prefix, "--to", f"oci:{dest}")
    assert asked(n) == []

    # a tag that names another image: the image is copied again, and the tag moved
    fault_proxy.fail("HEAD", f"/v2/{repo}/tiny/manifests/stable$", 404)
    n = len(fault_proxy.exchanges)
    cli("push", "-c", cat, "--registry", prefix)
    puts = [name for method, name in asked(n) if method == "PUT"]
    assert "stable" in puts and commit in puts, puts
    assert "sha256:" + hashlib.sha256(_skopeo_raw(f"{prefix}/tiny:stable")).hexdigest() == digest

    # a platform's manifest and a layer deleted under tags that still name the index: put back
    accept = {"Accept": MEDIA_MANIFEST}
    index = json.loads(
        registry.request("GET", f"/v2/{repo}/tiny/manifests/{digest}", headers={"Accept": MEDIA_INDEX})[2]
    )
    child = index["manifests"][0]["digest"]
    layer = json.loads(registry.request("GET", f"/v2/{repo}/tiny/manifests/{child}", headers=accept)[2])["layers"][0]
    assert registry.request("DELETE", f"/v2/{repo}/tiny/manifests/{child}")[0] == 202
    assert registry.request("DELETE", f"/v2/{repo}/tiny/blobs/{layer['digest']}")[0] == 202
    cli("push", "-c", cat, "--registry", prefix)
    assert registry.request("GET", f"/v2/{repo}/tiny/manifests/{child}", headers=accept)[0] == 200
    assert cli("verify", "-c", cat, "--from", prefix).stdout == "tiny  ok\n"

    # a token that may push but not read manifests (ECR's minimal push policy): pushed all the same
    fault_proxy.fail("HEAD", "/manifests/", 403, times=1000)
    cli("push", "-c", cat, "--registry", prefix)


def test_air_gap_round_trip(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    """Connected side: registry -> oci-archive; air-gapped side: archive -> another registry."""
    skopeo, umoci = require_tool("skopeo"), require_tool("umoci")
    cat = _catalog(tmp_path)
    source = f"{registry.host}/{registry.unique_repo('ci')}"
    cli("build", "-c", cat, "--push", "--registry", source)
    digest = _lock(cat)["tiny"]["image"]["digest"]
    lock_before = cat.with_suffix(".lock").read_bytes()

    archive = tmp_path / "transfer" / "models.tar"
    cli("mirror", "-c", cat, "--from", source, "--to", f"oci-archive:{archive}")
    inspected = subprocess.run(
        [skopeo, "inspect", "--raw", f"oci-archive:{archive}:tiny"], capture_output=True, check=True
    ).stdout
    assert "sha256:" + hashlib.sha256(inspected).hexdigest() == digest

    internal = f"{registry.host}/{registry.unique_repo('internal')}"
    cli("mirror", "-c", cat, "--from", f"oci-archive:{archive}", "--to", internal)
    assert "sha256:" + hashlib.sha256(_skopeo_raw(f"{internal}/tiny:stable")).hexdigest() == digest
    assert cat.with_suffix(".lock").read_bytes() == lock_before  # the pins stay valid: nothing to change
    for store in (source, internal, f"oci-archive:{archive}"):
        assert cli("verify", "-c", cat, "--from", store).stdout == "tiny  ok\n"

    layout = tmp_path / "mirror-layout"
    cli("mirror", "-c", cat, "--from", internal, "--to", f"oci:{layout}")
    one = tmp_path / "one"
    subprocess.run(
        [skopeo, "copy", "--preserve-digests", f"oci:{layout}:tiny", f"oci:{one}:tiny"], capture_output=True, check=True
    )
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--rootless", "--image", f"{one}:tiny", str(bundle)], capture_output=True, check=True
    )
    root = bundle / "rootfs" / "models"
    for path, data in FILES.items():
        assert (root / path).read_bytes() == data
        assert stat.S_IMODE((root / path).stat().st_mode) == 0o644

    before = archive.stat().st_mtime_ns
    cli("mirror", "-c", cat, "--from", source, "--to", f"oci-archive:{archive}")  # nothing new: archive kept
    assert archive.stat().st_mtime_ns == before


def test_verify_names_what_is_corrupt(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"
    index = json.loads((layout / "blobs" / "sha256" / _lock(cat)["tiny"]["image"]["digest"][7:]).read_bytes())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    small = manifest["layers"][0]["digest"]
    blob = layout / "blobs" / "sha256" / small[7:]
    data = bytearray(blob.read_bytes())
    offset = data.index(b'{"model_type"')
    data[offset + 2 : offset + 7] = b"MODEL"  # same size, other bytes
    blob.write_bytes(bytes(data))
    result = cli("verify", "-c", cat, "--json", code=1)
    doc = json.loads(result.stdout)
    problems = doc["models"][0]["problems"]
    assert any(p.startswith(f"layer {small}: the stored bytes have digest") for p in problems)
    assert any(p.startswith("config.json: sha256 ") for p in problems)
    # why it failed, as every command's --json and error line say it
    assert doc["ok"] is False and doc["error"] == "1 of 1 model failed the check: tiny"
    assert "error: 1 of 1 model failed the check: tiny\n" in result.stderr
    assert doc["models"][0]["damaged"] is True
    # and on stderr, for a CI log that keeps only that: each problem, named by model
    assert f"modelcar: tiny: layer {small}: the stored bytes have digest" in result.stderr
    # zeroed: it reads as an empty tar, and its files are damaged, not "missing from the image"
    blob.write_bytes(bytes(len(data)))
    problems = json.loads(cli("verify", "-c", cat, "--json", code=1).stdout)["models"][0]["problems"]
    assert any(p.startswith(f"layer {small}: the stored bytes have digest") for p in problems)
    assert not [p for p in problems if "missing from the image" in p], problems


def test_a_malformed_manifest_or_index_is_named_not_a_traceback(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """What a broken registry, proxy or hand-edited layout sends is checked before it is used: a
    descriptor's digest names a file of a layout, its size a byte count."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/{tmp_path.name}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    bad = f"sha256:{'a' * 64}"
    bodies = {
        b"[]": "is no JSON object",
        b'{"layers": [{"digest": 5}]}': "a descriptor without a mediaType",
        b'{"config": {"mediaType": "x", "digest": "sha256:zz", "size": 1}, "layers": []}': "whose digest is no digest",
        b'{"layers": "x"}': "layers is no list",
        f'{{"config": {{"mediaType": "x", "digest": "{bad}", "size": -1}}, "layers": []}}'.encode(): "not a byte",
        b'{"manifests": [{"mediaType": "x", "digest": "../../x", "size": 1}]}': "whose digest is no digest",
        b'{"manifests": []}': "an index of no image",
        b"\xff{": "not a valid manifest or index",
    }
    for body, said in bodies.items():
        fault_proxy.fail("GET", "/manifests/stable$", 200, body=body, headers={"Content-Type": MEDIA_MANIFEST})
        result = cli("inspect", f"{prefix}/tiny:stable", "--json", code=1)
        error = json.loads(result.stdout)["error"]
        assert error.startswith(f"{fault_proxy.host}") and said in error, (body, error)

    # a blob sent on to a host no client can name
    fault_proxy.fail("GET", "/blobs/", 307, headers={"Location": "http://xn--a.com:1/x"}, times=100)
    result = cli("inspect", f"{prefix}/tiny:stable", "--json", code=1)
    assert "the registry sent a URL that cannot be used" in json.loads(result.stdout)["error"]
    fault_proxy.clear()

    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:zz"
    (layout / "index.json").write_text(json.dumps(index))
    for args in (["inspect", f"oci:{layout}:tiny"], ["build", "-c", cat]):
        result = cli(*args, "--json", code=1)
        error = json.loads(result.stdout)["error"]
        assert f"{layout / 'index.json'}: not a valid OCI index" in error and "sha256:zz" in error, error
    # another tool's sha512 image in a shared layout is its own business: modelcar builds on
    index["manifests"][0]["digest"] = "sha512:" + "a" * 128
    index["manifests"][0]["annotations"] = {ANN_REF: "other-tool"}
    (layout / "index.json").write_text(json.dumps(index))
    cli("build", "-c", cat)
    assert "modelcar reads sha256 blobs only" in cli("inspect", f"oci:{layout}:other-tool", code=1).stderr


@pytest.mark.parametrize("offset", [600, -600], ids=["in-a-header", "in-the-end-blocks"])
def test_inspect_of_a_damaged_layer_says_so(cli: Cli, tmp_path: Path, offset: int) -> None:
    """inspect listed what it could read of a damaged small-files layer (nothing, after a bad
    header; everything, with the end blocks damaged) and exited 0."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    info = json.loads(cli("inspect", f"oci:{layout}:tiny", "--json").stdout)
    small = next(layer["digest"] for layer in info["layers"] if len(layer["files"]) > 1)
    blob = layout / "blobs" / "sha256" / small.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0xFF
    blob.write_bytes(data)
    result = cli("inspect", f"oci:{layout}:tiny", "--json", code=1)
    error = json.loads(result.stdout)["error"]
    assert f"layer {small}: " in error and ("the stored bytes have digest" in error or "not a readable tar" in error)


def test_inspect_any_store(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    digest = _lock(cat)["tiny"]["image"]["digest"]
    layout = tmp_path / ".modelcar" / "oci"
    prefix = f"{registry.host}/{registry.unique_repo('inspect')}"
    cli("push", "-c", cat, "--registry", prefix)
    for ref in (f"oci:{layout}:tiny", f"oci:{layout}@{digest}", f"{prefix}/tiny:stable", f"{prefix}/tiny@{digest}"):
        info = json.loads(cli("inspect", ref, "--json").stdout)
        assert info["digest"] == digest
        again = json.loads(cli("inspect", info["reference"], "--json").stdout)  # the reference it gives reads back
        assert again["digest"] == digest and again["reference"] == info["reference"]
        assert info["annotations"]["org.opencontainers.image.title"] == "tiny"
        assert [p["architecture"] for p in info["platforms"]] == ["amd64", "arm64"]
        assert sorted(f["path"] for f in info["files"]) == sorted(FILES)
        assert [len(layer["files"]) for layer in info["layers"]] == [3, 1]
    text = cli("inspect", f"oci:{layout}:tiny").stdout
    assert "model.safetensors" in text and "platform linux/arm64" in text
    # a name with colons, as ctr and BuildKit write them (and skopeo reads them)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append({**index["manifests"][0], "annotations": {ANN_REF: "docker.io/library/tiny:latest"}})
    (layout / "index.json").write_text(json.dumps(index))
    assert (
        json.loads(cli("inspect", f"oci:{layout}:docker.io/library/tiny:latest", "--json").stdout)["digest"] == digest
    )
    result = cli("inspect", f"oci:{layout}:nope", code=1)
    assert "no image named 'nope'" in result.stderr
    result = cli("inspect", f"{prefix}/tiny:nope", code=1)  # a tag, said as one (it said "manifest nope")
    assert f"{prefix}/tiny: tag nope not found" in result.stderr
    by_name = json.loads(cli("inspect", "tiny", "-c", cat, "--json").stdout)  # the locked image, in the layout
    assert by_name["digest"] == digest and by_name["layers"] == info["layers"]
    bad = f"{registry.host}:mc/tiny@{digest}"  # a colon for a slash
    result = cli("inspect", bad, code=2)
    assert (
        result.stderr
        == f"error: {bad!r}: '{registry.host}:mc/tiny' is not a registry prefix: use HOST[:PORT]/PATH, lowercase\n"
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("[::1]", True), ("[::1]:5000", True), ("localhost:5000", True), ("127.0.0.2:80", True), ("ghcr.io", False)],
)
def test_loopback_hosts_are_known_in_every_form(host: str, loopback: bool) -> None:
    """Plain HTTP and no proxy for a loopback registry, whatever form its name takes."""
    from modelcar.stores.registry_client import RegistryOptions, is_loopback

    assert is_loopback(host) is loopback
    assert RegistryOptions().scheme(host) == ("http" if loopback else "https")


def test_image_references_read_as_docker_reads_them() -> None:
    from modelcar.errors import InputError
    from modelcar.stores.spec import parse_image_ref

    digest = "sha256:" + "e" * 64
    image = parse_image_ref(f"registry.example:5000/acme/shell:1.36@{digest}")
    assert (image.store.host, image.repo, image.ref) == ("registry.example:5000", "acme/shell", digest)  # type: ignore[attr-defined]
    image = parse_image_ref(f"docker.io/busybox@{digest}")
    assert (image.repo, image.ref) == ("library/busybox", digest)
    image = parse_image_ref("ghcr.io/acme/tools/shell:v2")
    assert (image.repo, image.ref) == ("acme/tools/shell", "v2")
    # a name with no registry, as `docker pull` would take it: said so, not taken for user@host
    with pytest.raises(InputError, match=r"NAME@sha256:\.\.\. names no registry: use HOST/REPO@sha256"):
        parse_image_ref(f"busybox@{digest}")


def test_mirror_to_hf_cache_says_a_local_model_cannot_go_there(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A `path:` model has no repo id to be cached under: passed over in a catalog with Hub models,
    an error when named, or when nothing else is there (exit 0 having written nothing read as done)."""
    fake_hub.add_repo("org/tiny", FILES)
    _model(tmp_path / "m")
    cat = write_catalog(
        tmp_path / "catalog.yaml", "models:\n  - name: hub\n    hf: org/tiny\n  - name: local\n    path: ./m\n"
    )
    cli("build", "-c", cat)
    cache = tmp_path / "offline-cache"
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    assert result.stdout.startswith("hub  ") and "local: a local `path` model has no Hub repo id" in result.stderr
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", "local", code=2)
    assert "local: a local `path` model has no Hub repo id to be cached under" in result.stderr
    write_catalog(cat, "models:\n  - name: local\n    path: ./m\n")
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", code=2)
    assert "mirror it to a registry or an OCI layout instead" in result.stderr and result.stdout == ""


def test_mirror_to_hf_cache_writes_only_what_the_lock_and_the_image_agree_on(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """An offline snapshot a server loads without asking anyone: a file whose bytes are not the
    lock's, a file the lock lists that the image lacks, a layer whose bytes are not its digest's,
    each fail the mirror (exit 1), and no blob is named for bytes it does not hold. Nor is a
    snapshot left: huggingface_hub offline takes a commit's snapshot directory, once there, as the
    whole commit (the links were made as the image streamed: a failed run left one without the
    weights)."""
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n")
    cli("build", "-c", cat)
    lock_file = cat.with_suffix(".lock")
    good = lock_file.read_text()
    cache = tmp_path / "offline-cache"
    snapshots = [c / "models--org--tiny" / "snapshots" for c in (cache, tmp_path / "other-cache")]

    data = yaml.safe_load(good)
    (config,) = [f for f in data["models"]["tiny"]["files"] if f["path"] == "config.json"]
    config["sha256"] = "0" * 64
    lock_file.write_text(yaml.safe_dump(data))
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", code=1)
    assert f"config.json: sha256 {hashlib.sha256(FILES['config.json']).hexdigest()}, the lock has {'0' * 64}" in (
        result.stderr
    )
    assert not list(cache.rglob("0" * 64))
    assert not snapshots[0].exists()

    data = yaml.safe_load(good)
    data["models"]["tiny"]["files"].append({"path": "vocab.json", "size": 1, "sha256": "1" * 64})
    lock_file.write_text(yaml.safe_dump(data))
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", code=1)
    assert "org/tiny: the image lacks vocab.json" in result.stderr
    assert not snapshots[0].exists()

    # another model in the catalog still goes in, and is said; the run fails for the one
    fake_hub.add_repo("org/other", {"config.json": b'{"other": 1}'})
    write_catalog(cat, cat.read_text() + "  - name: other\n    hf: org/other\n")
    cli("build", "-c", cat, "other")
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", "--json", code=1)
    doc = json.loads(result.stdout)
    assert [m["name"] for m in doc["models"]] == ["other"]
    # the keys of any mirror's models, `to` where it went, and the snapshot a server loads
    assert doc["models"][0]["to"] == f"hf-cache:{cache}" and doc["models"][0]["from"].startswith("oci:")
    assert Path(doc["models"][0]["snapshot"]).parent == cache / "models--org--other" / "snapshots"
    assert doc["error"].startswith("tiny: org/tiny: the image lacks vocab.json")
    assert (cache / "models--org--other" / "snapshots").is_dir()

    write_catalog(cat, "models:\n  - name: tiny\n    hf: org/tiny\n")
    lock_file.write_text(good)
    _, (manifest, _) = _image_manifests(tmp_path / ".modelcar" / "oci", "tiny")
    weights = tmp_path / ".modelcar" / "oci" / "blobs" / "sha256" / manifest["layers"][-1]["digest"][7:]
    with weights.open("r+b") as f:  # the last end-of-archive block: every file is whole, the layer is not
        f.seek(-1, os.SEEK_END)
        f.write(b"\1")
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{tmp_path / 'other-cache'}", code=1)
    assert f"org/tiny: layer {manifest['layers'][-1]['digest']} has digest sha256:" in result.stderr
    assert not snapshots[1].exists()


@pytest.mark.parametrize("planted", ["snapshots/COMMIT", "blobs", "refs", "snapshots/COMMIT/sub"])
def test_mirror_to_hf_cache_writes_through_no_directory_link(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, planted: str
) -> None:
    """A cache on a shared volume where someone made a snapshot (or blobs, or refs) directory a link
    elsewhere: the mirror wrote the model's files there, over what was there. The cache's own
    directory may be a link: its owner put it where it is."""
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n    revision: main\n")
    cli("build", "-c", cat)
    real = tmp_path / "real-cache"
    real.mkdir()
    cache = tmp_path / "cache"
    cache.symlink_to(real)
    link = cache / "models--org--tiny" / planted.replace("COMMIT", _lock(cat)["tiny"]["commit"])
    link.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "merges.txt").write_text("keep me\n")
    link.symlink_to(outside)
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", code=1)
    assert f"{link}: a symbolic link in the Hugging Face cache, where a directory belongs" in result.stderr
    assert [p.name for p in outside.iterdir()] == ["merges.txt"]
    assert (outside / "merges.txt").read_text() == "keep me\n"
    link.unlink()
    ref = real / "models--org--tiny" / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(ref)  # where the branch's file belongs: read, it waited for a writer forever
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    assert ref.read_text() == _lock(cat)["tiny"]["commit"]


def test_a_snapshot_is_linked_whole_or_not_at_all(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The links are made in a staging directory renamed into place: a run that fails (a full disk)
    or is killed while linking left a snapshot of the first files only, which huggingface_hub
    offline loads by commit as the whole commit. A killed run's staging directory is swept once
    stale; a snapshot there already (huggingface_hub's own downloads) is completed in place."""
    import modelcar.hfcache as hfcache

    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n")
    cli("build", "-c", cat)
    commit = _lock(cat)["tiny"]["commit"]
    cache = tmp_path / "offline-cache"
    snapshots = cache / "models--org--tiny" / "snapshots"
    real, calls = hfcache.replace_symlink, []

    def full_disk_at_the_second(link: Path, target: str) -> None:
        calls.append(link)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", target, None, str(link) + ".tmp")
        real(link, target)

    monkeypatch.setattr(hfcache, "replace_symlink", full_disk_at_the_second)
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", code=1)
    in_snapshot = Path(*calls[1].relative_to(snapshots).parts[1:])  # under the staging directory
    assert f"{snapshots / commit / in_snapshot}: No space left on device" in result.stderr
    assert list(snapshots.iterdir()) == []  # no snapshot, no staging directory
    monkeypatch.setattr(hfcache, "replace_symlink", real)

    stale = snapshots / f".{commit}.0123456789ab.staging"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "merges.txt").symlink_to("../../../blobs/gone")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    partial = snapshots / commit
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # as huggingface_hub's download of one file leaves it
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    assert not stale.exists()
    assert sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if not p.is_dir()) == sorted(FILES)
    assert {p: (partial / p).read_bytes() for p in FILES} == FILES


def test_a_snapshot_that_is_a_link_leading_nowhere_is_refused_as_a_link(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """Taken for no snapshot at all (it does not exist, followed), it was staged and renamed onto
    the link: an error naming the staging directory, "Not a directory"."""
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n")
    cli("build", "-c", cat)
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / _lock(cat)["tiny"]["commit"]
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tmp_path / "gone")
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{tmp_path / 'cache'}", code=1)
    assert f"{snapshot}: a symbolic link in the Hugging Face cache, where a directory belongs" in result.stderr
    assert not (tmp_path / "gone").exists() and [p.name for p in snapshot.parent.iterdir()] == [snapshot.name]


def test_a_mirror_to_an_hf_cache_that_holds_the_files_reads_no_weight_layer(
    cli: Cli, registry: Registry, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run again over the same cache (every CI run seeding an air-gapped cache), the mirror read
    every layer of the image, from a registry downloading the whole model, to throw it away. A
    one-file layer whose blob the cache holds whole is not read; a blob gone from the cache is."""
    import modelcar.hfcache as hfcache

    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n")
    prefix = f"{registry.host}/{registry.unique_repo('hfc')}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    cache = tmp_path / "offline-cache"
    read: list[int] = []
    real = hfcache.read_blob

    def counted(store: Any, repo: str, layer: Any) -> Any:
        read.append(layer.size)
        return real(store, repo, layer)

    monkeypatch.setattr(hfcache, "read_blob", counted)
    cli("mirror", "-c", cat, "--from", prefix, "--to", f"hf-cache:{cache}")
    assert max(read) > len(BIG)  # the weights' layer, the first time
    read.clear()
    cli("mirror", "-c", cat, "--from", prefix, "--to", f"hf-cache:{cache}")
    assert read and max(read) < len(BIG)  # the small files' layer only
    (weights,) = [b for b in (cache / "models--org--tiny" / "blobs").iterdir() if b.stat().st_size == len(BIG)]
    weights.unlink()
    read.clear()
    cli("mirror", "-c", cat, "--from", prefix, "--to", f"hf-cache:{cache}")
    assert max(read) > len(BIG) and weights.read_bytes() == BIG


def test_mirror_to_hf_cache_serves_offline(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n    revision: main\n")
    cli("build", "-c", cat)
    commit = _lock(cat)["tiny"]["commit"]
    cache = tmp_path / "offline-cache"
    result = cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    digest, layout = _lock(cat)["tiny"]["image"]["digest"], tmp_path / ".modelcar" / "oci"
    snapshot = cache / "models--org--tiny" / "snapshots" / commit
    assert result.stdout == f"tiny  {digest}  oci:{layout} -> {snapshot}\n"  # as a mirror to any store says it
    ref = cache / "models--org--tiny" / "refs" / "main"
    assert ref.read_text() == commit
    written = ref.stat()
    (doc,) = json.loads(cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}", "--json").stdout)["models"]
    # the same again writes nothing: a cache on read-only media, or another user's, takes it
    assert (ref.stat().st_ino, ref.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert doc == {
        "name": "tiny",
        "digest": digest,
        "from": f"oci:{layout}",
        "to": f"hf-cache:{cache}",
        "snapshot": str(snapshot),
    }

    script = (
        "import sys\nfrom huggingface_hub import snapshot_download\n"
        "print(snapshot_download('org/tiny', revision='main', local_files_only=True))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**_base_env(), **env})
    assert proc.returncode == 0, proc.stderr
    snapshot = Path(proc.stdout.strip())
    assert snapshot == cache / "models--org--tiny" / "snapshots" / commit
    for path, data in FILES.items():
        assert (snapshot / path).read_bytes() == data
        assert (snapshot / path).is_symlink()

    # a blob rotted in place (same size) is written again by the next mirror, not kept
    blob = (snapshot / "config.json").resolve()
    blob.write_bytes(b"\0" * blob.stat().st_size)
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    assert (snapshot / "config.json").read_bytes() == FILES["config.json"]


def test_mirror_to_hf_cache_again_hashes_only_the_blobs_changed_since(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_xattrs: None
) -> None:
    """The blobs a mirror wrote are stamped as checked (checked.py): the next mirror into the same
    cache reads the image again but hashes only the blobs written to since."""
    import os

    from modelcar import checked, hfcache

    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n    revision: main\n")
    cli("build", "-c", cat)
    cache = tmp_path / "offline-cache"
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    locked = {f["path"]: f["sha256"] for f in _lock(cat)["tiny"]["files"]}
    blobs = cache / "models--org--tiny" / "blobs"
    assert all(checked.is_stamped(blobs / sha256, sha256) for sha256 in locked.values())

    hashed: list[Path] = []
    real = hfcache.sha256_file
    monkeypatch.setattr(hfcache, "sha256_file", lambda path: hashed.append(path) or real(path))
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    assert hashed == []

    blob = blobs / locked["config.json"]
    os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 1))  # written to since
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    assert hashed == [blob]  # that blob alone, intact: kept and stamped again
    assert checked.is_stamped(blob, locked["config.json"])


def test_mirrors_into_one_hf_cache_at_once_while_a_server_reads_it(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """Links are replaced in one step: runs at once do not collide, a reader never finds a file
    missing (a server loading from the cache while the mirror runs again)."""
    from modelcar.catalog import load_catalog
    from modelcar.fsutil import replace_symlink
    from modelcar.hfcache import mirror_to_hf_cache
    from modelcar.stores.layout import LayoutStore
    from modelcar.stores.registry_client import RegistryOptions

    files = {f"f{i:03d}.json": f'{{"i": {i}}}\n'.encode() for i in range(150)}
    fake_hub.add_repo("org/many", files)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: many\n    hf: org/many\n    revision: main\n")
    cli("build", "-c", cat)
    catalog = load_catalog(cat)
    cache = tmp_path / "offline-cache"
    cli("mirror", "-c", cat, "--to", f"hf-cache:{cache}")
    snapshot = next(cache.glob("models--org--many/snapshots/*"))
    errors: list[BaseException] = []
    missing: list[str] = []
    done = threading.Event()

    blobs = {name: str((snapshot / name).resolve()) for name in files}

    def mirror() -> None:
        try:
            for _ in range(3):
                for name, blob in blobs.items():  # the same file by another link, for the mirror to replace
                    replace_symlink(snapshot / name, blob)
                mirror_to_hf_cache(
                    catalog,
                    None,
                    cache,
                    source=None,
                    layout=LayoutStore(catalog.root / ".modelcar" / "oci"),
                    options=RegistryOptions.create(),
                )
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        while not done.is_set():
            for name in files:
                try:
                    (snapshot / name).stat()
                except FileNotFoundError:
                    missing.append(name)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=mirror) for _ in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert errors == [] and missing == []
    assert all((snapshot / name).read_bytes() == data for name, data in files.items())
    assert all(not os.readlink(snapshot / name).startswith("/") for name in files)  # the mirror's, relative


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HF_")}


OCI_TYPES = {
    "manifest": "application/vnd.oci.image.manifest.v1+json",
    "config": "application/vnd.oci.image.config.v1+json",
    "layer": "application/vnd.oci.image.layer.v1.tar+gzip",
}
DOCKER_TYPES = {
    "manifest": "application/vnd.docker.distribution.manifest.v2+json",
    "config": "application/vnd.docker.container.image.v1+json",
    "layer": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    """Write a blob into a layout; its descriptor without the media type."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _name_in_layout(layout: Path, name: str, desc: dict[str, Any]) -> None:
    index_file = layout / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"].append({**desc, "annotations": {"org.opencontainers.image.ref.name": name}})
    index_file.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def _base_image(
    layout: Path,
    types: dict[str, str] = OCI_TYPES,
    *,
    arch: str = "amd64",
    variant: str | None = None,
    extra: dict[str, bytes] | None = None,
) -> str:
    """A small single-platform base (a gzip layer with a file, and `extra` files, and a config with
    Env), as any registry would hold one, named `base` (`base-ARCH` for another architecture);
    returns its manifest digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in {"etc/base-release": b"ID=modelcar-test-base\n", **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    diff = buf.getvalue()
    layer = _put_blob(layout, gzip.compress(diff, mtime=0))
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            **({"variant": variant} if variant else {}),
            "config": {"Env": ["PATH=/bin"], "User": "65532"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(diff).hexdigest()]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "test base"}],
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": types["manifest"],
            "config": {"mediaType": types["config"], **_put_blob(layout, config)},
            "layers": [{"mediaType": types["layer"], **layer}],
        }
    ).encode()
    desc = {"mediaType": types["manifest"], **_put_blob(layout, manifest)}
    _name_in_layout(layout, "base" if arch == "amd64" else f"base-{arch}", desc)
    return str(desc["digest"])


def _two_platform_base(layout: Path, arm_extra: dict[str, bytes] | None = None) -> str:
    """linux/amd64 and linux/arm64/v8 of the small base in one index, named `multi`; returns the
    index digest."""
    # as buildx writes them: architecture first, and fields a platform name has no place for
    platforms = [
        {"architecture": "amd64", "os": "linux", "os.features": ["sse4"]},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    manifests = [_base_image(layout), _base_image(layout, arch="arm64", variant="v8", extra=arm_extra)]
    blobs = layout / "blobs" / "sha256"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_TYPES["manifest"],
                    "digest": digest,
                    "size": (blobs / digest.removeprefix("sha256:")).stat().st_size,
                    "platform": platform,
                }
                for digest, platform in zip(manifests, platforms, strict=True)
            ],
        }
    ).encode()
    desc = {"mediaType": MEDIA_INDEX, **_put_blob(layout, index)}
    _name_in_layout(layout, "multi", desc)
    return str(desc["digest"])


def _with_attestation(layout: Path, manifest_digest: str) -> str:
    """An index of the base's manifest, a Windows one (a foreign layer) and a BuildKit attestation
    manifest (platform unknown/unknown, an in-toto statement for its one layer), as Docker Official
    Images carry them, named `withatt`; returns the index digest."""
    statement = _put_blob(
        layout, b'{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document"}'
    )
    config = _put_blob(
        layout,
        b'{"architecture":"unknown","os":"unknown","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}'
        % statement["digest"].encode(),
    )
    attestation = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_TYPES["manifest"],
            "config": {"mediaType": OCI_TYPES["config"], **config},
            "layers": [{"mediaType": "application/vnd.in-toto+json", **statement}],
        }
    ).encode()
    windows = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_TYPES["manifest"],
            "config": {"mediaType": OCI_TYPES["config"], **config},
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "digest": "sha256:" + "f" * 64,
                    "size": 1 << 30,
                    "urls": ["https://mcr.microsoft.com/v2/windows/servercore/blobs/sha256:" + "f" * 64],
                }
            ],
        }
    ).encode()
    manifest = (layout / "blobs" / "sha256" / manifest_digest.removeprefix("sha256:")).read_bytes()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_TYPES["manifest"],
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
                {
                    "mediaType": OCI_TYPES["manifest"],
                    **_put_blob(layout, windows),
                    "platform": {"os": "windows", "architecture": "amd64", "os.version": "10.0.20348.2340"},
                },
                {
                    "mediaType": OCI_TYPES["manifest"],
                    **_put_blob(layout, attestation),
                    "platform": {"os": "unknown", "architecture": "unknown"},
                    "annotations": {
                        "vnd.docker.reference.digest": manifest_digest,
                        "vnd.docker.reference.type": "attestation-manifest",
                    },
                },
            ],
        }
    ).encode()
    desc = {"mediaType": MEDIA_INDEX, **_put_blob(layout, index)}
    _name_in_layout(layout, "withatt", desc)
    return str(desc["digest"])


def test_base_image_layers_go_under_the_model(
    cli: Cli, fault_proxy: FaultProxy, registry: Registry, tmp_path: Path
) -> None:
    skopeo, umoci = require_tool("skopeo"), require_tool("umoci")
    base_digest = _base_image(tmp_path / "base-layout")
    subprocess.run(
        [
            skopeo,
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{tmp_path / 'base-layout'}:base",
            f"docker://{registry.host}/bases/busybox:1",
        ],
        capture_output=True,
        check=True,
    )
    base_ref = f"{fault_proxy.host}/bases/busybox@{base_digest}"
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: {base_ref}\n")
    cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/withbase")
    digest = _lock(cat)["tiny"]["image"]["digest"]
    assert fault_proxy.count("POST", r"/v2/withbase/tiny/blobs/uploads/\?mount=.*&from=bases/busybox") == 1

    index = json.loads(_skopeo_raw(f"{registry.host}/withbase/tiny@{digest}"))
    assert [m["platform"] for m in index["manifests"]] == [{"os": "linux", "architecture": "amd64"}]
    manifest = json.loads(_skopeo_raw(f"{registry.host}/withbase/tiny@{index['manifests'][0]['digest']}"))
    assert manifest["layers"][0]["mediaType"].endswith("tar+gzip") and len(manifest["layers"]) == 3

    # Reproducible: the same build into a layout gives the same digest; unpacked, base and model are both there.
    cli("build", "-c", cat)
    assert json.loads((tmp_path / ".modelcar" / "oci" / "index.json").read_text())["manifests"][0]["digest"] == digest
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--rootless", "--image", f"{tmp_path / '.modelcar' / 'oci'}:tiny", str(bundle)],
        capture_output=True,
        check=True,
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "etc" / "base-release").read_bytes() == b"ID=modelcar-test-base\n"
    assert (rootfs / "models" / "model.safetensors").read_bytes() == BIG
    config = json.loads((bundle / "config.json").read_text())
    assert "PATH=/bin" in config["process"]["env"]
    assert cli("verify", "-c", cat, "--from", f"{registry.host}/withbase").stdout == "tiny  ok\n"
    # the base's history goes on before ours, one entry per layer (buildah refuses a FROM image
    # whose history covers fewer layers than its diff_ids)
    image_config = json.loads(_skopeo_raw(f"{registry.host}/withbase/tiny@{digest}", config=True))
    history = [h["created_by"] for h in image_config["history"]]
    assert history[0] == "test base" and all(h.startswith("modelcar: add ") for h in history[1:])
    assert len([h for h in image_config["history"] if not h.get("empty_layer")]) == len(
        image_config["rootfs"]["diff_ids"]
    )


def _unpacked(tmp_path: Path, layout: Path, name: str) -> Path:
    bundle = tmp_path / f"bundle-{name}"
    subprocess.run(
        [require_tool("umoci"), "unpack", "--rootless", "--image", f"{layout}:{name}", str(bundle)],
        capture_output=True,
        check=True,
    )
    return bundle / "rootfs"


def _image_manifests(layout: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    blobs = layout / "blobs" / "sha256"
    (entry,) = [
        m
        for m in json.loads((layout / "index.json").read_text())["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == name
    ]
    index = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_text())
    return index, [json.loads((blobs / m["digest"].removeprefix("sha256:")).read_text()) for m in index["manifests"]]


def test_a_base_s_attestations_are_no_platform_and_its_docker_layer_types_become_oci(cli: Cli, tmp_path: Path) -> None:
    """A Docker-format base with BuildKit attestations (as Docker Official Images are): the image
    built on it has the base's one platform, OCI layer types only, and unpacks with umoci."""
    base = tmp_path / "base-layout"
    index_digest = _with_attestation(base, _base_image(base, DOCKER_TYPES))
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: oci:{base}:withatt@{index_digest}\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index, manifests = _image_manifests(layout, "tiny")
    assert [m["platform"] for m in index["manifests"]] == [{"os": "linux", "architecture": "amd64"}]
    assert [layer["mediaType"] for layer in manifests[0]["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar",
    ]
    rootfs = _unpacked(tmp_path, layout, "tiny")
    assert (rootfs / "etc" / "base-release").read_bytes() == b"ID=modelcar-test-base\n"
    assert (rootfs / "models" / "model.safetensors").read_bytes() == BIG
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_platforms_make_the_index_a_node_of_that_architecture_pulls(cli: Cli, tmp_path: Path) -> None:
    """A data-only image for IBM Z and Power nodes: the index lists just those platforms (in one
    order, whatever the catalog's), skopeo picks the model out of it for s390x, and the lock
    records them, so the default image is built again when the key goes."""
    skopeo = require_tool("skopeo")
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n    platforms: [linux/s390x, linux/ppc64le]\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index, manifests = _image_manifests(layout, "tiny")
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "ppc64le"},
        {"os": "linux", "architecture": "s390x"},
    ]
    assert manifests[0]["layers"] == manifests[1]["layers"]
    inspect = subprocess.run(
        [skopeo, "--override-arch", "s390x", "inspect", f"oci:{layout}:tiny"], capture_output=True, check=True
    )
    assert json.loads(inspect.stdout)["Architecture"] == "s390x"
    image = _lock(cat)["tiny"]["image"]
    assert image["platforms"] == ["linux/ppc64le", "linux/s390x"]

    # the key gone: the default amd64 + arm64 image, and a lock that says nothing of platforms
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n")
    cli("build", "-c", cat)
    index, _ = _image_manifests(layout, "tiny")
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    assert "platforms" not in _lock(cat)["tiny"]["image"] and _lock(cat)["tiny"]["image"]["digest"] != image["digest"]
    # the default, named: the same image as no key
    default = _lock(cat)["tiny"]["image"]["digest"]
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n    platforms: [linux/arm64, linux/amd64]\n")
    cli("build", "-c", cat)
    assert _lock(cat)["tiny"]["image"]["digest"] == default


def test_platforms_pick_from_a_base_s_and_name_what_it_lacks(cli: Cli, tmp_path: Path) -> None:
    base = tmp_path / "base-layout"
    ref = f"oci:{base}:multi@{_two_platform_base(base)}"
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: {ref}\n    platforms: [linux/arm64]\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index, (manifest,) = _image_manifests(layout, "tiny")
    assert [m["platform"] for m in index["manifests"]] == [{"os": "linux", "architecture": "arm64", "variant": "v8"}]
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    assert (config["architecture"], config["variant"]) == ("arm64", "v8")
    # only the arm64 base's blobs came over (the two share their one layer; not the amd64 config)
    _, (amd64, _) = _image_manifests(base, "multi")
    config_blob = amd64["config"]["digest"].removeprefix("sha256:")
    assert json.loads((base / "blobs" / "sha256" / config_blob).read_text())["architecture"] == "amd64"
    assert not (layout / "blobs" / "sha256" / config_blob).exists()
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"

    model = f"  - name: tiny\n    path: ./m\n    base: {ref}\n    platforms: [linux/s390x, linux/amd64]\n"
    cat = _catalog(tmp_path, model)
    result = cli("build", "-c", cat, code=1)
    assert (
        f"tiny: base {ref} has no linux/s390x (it has linux/amd64, linux/arm64/v8): pick a base built for it, "
        "or take it out of `platforms:`"
    ) in result.stderr


def test_inspect_gives_each_platform_s_layers_of_a_base_that_differs_by_platform(cli: Cli, tmp_path: Path) -> None:
    """The first platform's layers and bytes were all it said: a base's arm64 layer went unlisted."""
    base = tmp_path / "base-layout"
    ref = f"oci:{base}:multi@{_two_platform_base(base, arm_extra={'etc/arm': b'arm only'})}"
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: {ref}\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    _, (amd64, arm64) = _image_manifests(layout, "tiny")
    info = json.loads(cli("inspect", f"oci:{layout}:tiny", "--json").stdout)
    listed = [layer["digest"] for layer in info["layers"]]
    assert set(listed) == {d["digest"] for d in amd64["layers"] + arm64["layers"]} and len(listed) == len(set(listed))
    assert len(listed) == len(amd64["layers"]) + 1  # the model's layers once, each base's own layer
    assert [p["bytes"] for p in info["platforms"]] == [
        sum(d["size"] for d in manifest["layers"]) for manifest in (amd64, arm64)
    ]
    assert info["bytes"] == sum(layer["size"] for layer in info["layers"])
    text = cli("inspect", f"oci:{layout}:tiny").stdout
    assert "  platform linux/arm64/v8  sha256:" in text


def test_inspect_says_when_no_layer_says_its_files(cli: Cli, tmp_path: Path) -> None:
    """Another tool's image, or a modelcar image copied without --preserve-digests (its layers
    recompressed, their annotations gone): an empty file list read as an image of no files."""
    layout = tmp_path / "base-layout"
    _base_image(layout)
    result = cli("inspect", f"oci:{layout}:base", "--json")
    assert json.loads(result.stdout)["files"] == []
    assert f"oci:{layout}: base: no layer says which files it holds (1 without modelcar's annotations" in result.stderr
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    assert "no layer says" not in cli("inspect", f"oci:{tmp_path / '.modelcar' / 'oci'}:tiny").stderr


def test_a_base_in_an_archive_is_let_go_after_each_build(cli: Cli, tmp_path: Path) -> None:
    """The archive reader keeps its descriptor until closed: a build (or a library caller's many
    builds) left one open per run on an `oci-archive:` base, also when the base was refused."""
    base = tmp_path / "base-layout"
    digest = _base_image(base)
    archive = tmp_path / "base.tar"
    subprocess.run(["tar", "-C", str(base), "-cf", str(archive), "."], check=True)

    def held() -> list[str]:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in links if link == str(archive)]

    model = f"  - name: tiny\n    path: ./m\n    base: oci-archive:{archive}:base@{digest}\n"
    cat = _catalog(tmp_path, model)
    for _ in range(2):
        cli("build", "-c", cat, "--no-cache")
        assert held() == []
    write_catalog(cat, f"models:\n{model}    platforms: [linux/s390x]\n")
    assert "has no linux/s390x" in cli("build", "-c", cat, code=1).stderr
    assert held() == []


def test_a_base_whose_config_is_not_its_digest_s_is_refused(cli: Cli, tmp_path: Path) -> None:
    """A base config changed in its store (same size, other bytes): what the image would carry is
    not what the digest the catalog pins says."""
    base = tmp_path / "base-layout"
    digest = _base_image(base)
    manifest = json.loads((base / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())
    config = base / "blobs" / "sha256" / manifest["config"]["digest"].removeprefix("sha256:")
    config.write_bytes(config.read_bytes().replace(b'"linux"', b'"Linux"'))
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: oci:{base}:base@{digest}\n")
    result = cli("build", "-c", cat, code=1)
    assert f"config {manifest['config']['digest']} does not match its bytes" in result.stderr


def test_a_base_that_is_not_there_names_the_entry_and_its_field(cli: Cli, tmp_path: Path) -> None:
    """Said as the store said it ("manifest ... not found"): which catalog entry, which field."""
    base = tmp_path / "base-layout"
    _base_image(base)
    gone = "sha256:" + "a" * 64
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: oci:{base}:base@{gone}\n")
    result = cli("build", "-c", cat, code=1)
    assert result.stderr.endswith(
        f"error: tiny: {cat}: models[0] (tiny): base: oci:{base}: manifest {gone} not found\n"
    )


def test_a_base_whose_layer_is_no_filesystem_is_refused(cli: Cli, tmp_path: Path) -> None:
    base = tmp_path / "base-layout"
    _base_image(base, {**OCI_TYPES, "layer": "application/vnd.in-toto+json"})
    (entry,) = json.loads((base / "index.json").read_text())["manifests"]
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: oci:{base}:base@{entry['digest']}\n")
    result = cli("build", "-c", cat, code=1)
    assert "is application/vnd.in-toto+json, not a filesystem layer" in result.stderr
    assert f"base oci:{base}:base@{entry['digest']}" in result.stderr and "Traceback" not in result.stderr


def test_a_modelcar_image_as_a_base_is_refused(cli: Cli, tmp_path: Path) -> None:
    """Its layers put another model's files under /models beside this one's: vLLM would read them
    with it (a tokenizer this model lacks), and verify then named the base's files as damage to
    mend with `build --no-cache`. Said at the build, by the layers' annotations (nothing read)."""
    _model(tmp_path / "m")
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n")
    cli("build", "-c", cat)
    digest, layout = _lock(cat)["tiny"]["image"]["digest"], tmp_path / ".modelcar" / "oci"
    base = f"oci:{layout}:tiny@{digest}"
    _model(tmp_path / "other", {"config.json": b'{"other": 1}'})
    write_catalog(cat, cat.read_text() + f"  - name: other\n    path: ./other\n    base: {base}\n")
    result = cli("build", "-c", cat, "other", code=2)
    assert (
        f"error: other: {cat}: models[1] (other): base: base {base}: a modelcar image (layer sha256:" in result.stderr
    )
    assert "pick a base with nothing under /models" in result.stderr
    assert "image" not in _lock(cat)["other"]


def test_an_index_in_an_index_is_refused_by_name(cli: Cli, tmp_path: Path) -> None:
    layout = tmp_path / "nested"
    inner = _with_attestation(layout, _base_image(layout))
    outer = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {"mediaType": MEDIA_INDEX, **_put_blob(layout, (layout / "blobs" / "sha256" / inner[7:]).read_bytes())}
            ],
        }
    ).encode()
    _name_in_layout(layout, "nested", {"mediaType": MEDIA_INDEX, **_put_blob(layout, outer)})
    result = cli("inspect", f"oci:{layout}:nested", code=1)
    assert f"{inner} is an index in an index (not supported)" in result.stderr and "Traceback" not in result.stderr


def test_mirror_takes_an_image_s_media_type_from_its_own_bytes(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A registry (or a proxy before it) that labels manifests application/json: the index's own
    mediaType, covered by its digest, decides, and its platforms are copied."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/mc")
    fault_proxy.reheader("GET", r"/manifests/", {"Content-Type": "application/json"}, times=100)
    cli("mirror", "-c", cat, "--from", f"{fault_proxy.host}/mc", "--to", f"oci:{tmp_path / 'copy'}")
    _, manifests = _image_manifests(tmp_path / "copy", "tiny")
    assert len(manifests) == 2 and all(m["layers"] for m in manifests)
    assert cli("verify", "-c", cat, "--from", f"oci:{tmp_path / 'copy'}").stdout == "tiny  ok\n"


def test_a_library_caller_mirroring_to_an_hf_cache_is_told_what_writes_one(tmp_path: Path) -> None:
    from modelcar.errors import InputError
    from modelcar.stores.spec import open_store

    with pytest.raises(InputError, match=r"holds files, not images: write it with `modelcar mirror --to hf-cache:DIR`"):
        open_store(f"hf-cache:{tmp_path}", write=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "nonsense",
            "'nonsense' is not a store: use HOST[:PORT]/PATH (a registry prefix), oci:DIR or oci-archive:FILE",
        ),
        ("oci:", "'oci:': name the directory: oci:PATH"),
        ("oci-archive: ", "'oci-archive: ': name the file: oci-archive:PATH"),
        (
            "/tmp/air.tar",
            "'/tmp/air.tar' is a path, not a store: oci:/tmp/air.tar for an OCI layout, oci-archive:/tmp/air.tar "
            "for an archive (or, for `mirror --to`, hf-cache:/tmp/air.tar for a Hugging Face cache)",
        ),
    ],
)
def test_bad_store_names(cli: Cli, tmp_path: Path, spec: str, message: str) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    result = cli("mirror", "-c", cat, "--to", spec, code=2)
    assert message in result.stderr


@pytest.mark.parametrize(
    ("flag", "spec", "message"),
    [
        ("--registry", "u:s3cret@127.0.0.1:5000/mc", "credentials do not go in a registry name"),
        ("--to", "u:s3cret@127.0.0.1:5000/mc", "credentials do not go in a registry name"),
        ("--registry", "https://u:s3cret@127.0.0.1:5000/mc", "credentials do not go in a registry name"),
        ("--to", "https://u:s3cret@127.0.0.1:5000/mc", "credentials do not go in a registry name"),
        ("--registry", "https://127.0.0.1:5000/mc", "is not a registry prefix: use HOST[:PORT]/PATH, without a scheme"),
        ("--registry", "https://u:s3c/ret@127.0.0.1:5000/mc", "credentials do not go in a registry name"),
        ("--registry", "Bad_Prefix.io/X", "'Bad_Prefix.io/X' is not a registry prefix"),
        ("--to", "registry.example/UPPER", "'registry.example/UPPER' is not a registry prefix"),
    ],
)
def test_a_bad_registry_name_on_the_command_line_is_refused_first(
    cli: Cli, tmp_path: Path, flag: str, spec: str, message: str
) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    result = cli("push" if flag == "--registry" else "mirror", "-c", cat, flag, spec, code=2)
    assert message in result.stderr and "s3cret" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_verify_reports_an_unreadable_layer(cli: Cli, tmp_path: Path, damage: str) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index = json.loads((layout / "blobs" / "sha256" / _lock(cat)["tiny"]["image"]["digest"][7:]).read_bytes())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    small = manifest["layers"][0]["digest"]
    blob = layout / "blobs" / "sha256" / small[7:]
    data = blob.read_bytes()
    blob.write_bytes(data[:5000] if damage == "truncated" else bytes(range(256)) * (len(data) // 256))
    result = cli("verify", "-c", cat, "--json", code=1)
    problems = json.loads(result.stdout)["models"][0]["problems"]  # a report, not a traceback
    assert any(p.startswith(f"layer {small}: ") for p in problems)
    if damage == "truncated":  # a blob of the wrong size is no copy of it: the next build writes it again
        assert "1 written" in cli("build", "-c", cat).stderr
    else:  # of the right size, only reading it tells: what --no-cache does
        assert "(0 written, 2 already there)" in cli("build", "-c", cat).stderr
        cli("build", "-c", cat, "--no-cache")
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_verify_goes_on_past_a_blob_or_a_layout_this_user_may_not_read(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob a producer left mode 0600 under another user: verify stopped for every model with
    one `Permission denied` line (the other model's `ok` lost, this one never named)."""
    import errno

    from modelcar.stores import layout as layout_module

    _model(tmp_path / "m2", {"config.json": b'{"model_type": "other"}\n'})
    cat = _catalog(tmp_path, "  - name: other\n    path: ./m2\n  - name: tiny\n    path: ./m\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    _, blob = _weights_blob(layout, _lock(cat)["tiny"]["image"]["digest"])
    iter_file = layout_module.iter_file

    def not_for_this_user(path: Path, *args: Any) -> Any:
        if path == blob:  # what root cannot be made to see by chmod: the tests run as root in CI
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return iter_file(path, *args)

    monkeypatch.setattr(layout_module, "iter_file", not_for_this_user)
    doc = json.loads(cli("verify", "-c", cat, "--json", code=1).stdout)
    problems = {m["name"]: m["problems"] for m in doc["models"]}
    assert problems == {"other": [], "tiny": [f"{blob}: Permission denied"]}
    # the image may well be whole: no rebuild is offered (`build --no-cache` would write another's blob)
    assert "--no-cache" not in cli("verify", "-c", cat, code=1).stderr

    def layout_not_for_this_user(self: Any, repo: str, ref: str) -> Any:  # another user's, mode 0700
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(layout / "blobs"))

    monkeypatch.setattr(layout_module.LayoutStore, "get_manifest", layout_not_for_this_user)
    doc = json.loads(cli("verify", "-c", cat, "--json", code=1).stdout)
    assert [m["problems"] for m in doc["models"]] == [[f"{layout / 'blobs'}: Permission denied"]] * 2


def _repinned(
    cat: Path,
    layout: Path,
    edit: Callable[[dict[str, str], list[dict[str, Any]]], None],
    config_edit: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Pin the lock to the model's image with each platform's layer list edited (`edit` gets the
    platform and the list), configs made to match, then edited too (`config_edit`): an image as
    someone else may have pushed it."""
    blobs = layout / "blobs" / "sha256"
    lock = yaml.safe_load(cat.with_suffix(".lock").read_text())
    index = json.loads((blobs / lock["models"]["tiny"]["image"]["digest"][7:]).read_bytes())
    for entry in index["manifests"]:
        manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
        edit(entry["platform"], manifest["layers"])
        config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
        config["rootfs"]["diff_ids"] = [layer["digest"] for layer in manifest["layers"]]
        if config_edit is not None:
            config_edit(config)
        manifest["config"].update(_put_blob(layout, json.dumps(config).encode()))
        entry.update(_put_blob(layout, json.dumps(manifest).encode()))
    lock["models"]["tiny"]["image"]["digest"] = _put_blob(layout, json.dumps(index).encode())["digest"]
    cat.with_suffix(".lock").write_text(yaml.safe_dump(lock))


def _tar_layer(layout: Path, add: Callable[[tarfile.TarFile], None]) -> dict[str, Any]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf)
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_put_blob(layout, buf.getvalue())}


def _no_change(platform: dict[str, str], layers: list[dict[str, Any]]) -> None:
    pass


def _wrong_diff_id(config: dict[str, Any]) -> None:
    config["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64


def _one_diff_id_less(config: dict[str, Any]) -> None:
    config["rootfs"]["diff_ids"].pop()


def _other_architecture(config: dict[str, Any]) -> None:
    config["architecture"] = "s390x"


def _size_one_more(platform: dict[str, str], layers: list[dict[str, Any]]) -> None:
    layers[1]["size"] += 1


@pytest.mark.parametrize(
    ("edit", "config_edit", "problem"),
    [
        (_no_change, _wrong_diff_id, f"diff_id sha256:{'0' * 64} is not layer sha256:"),
        (_no_change, _one_diff_id_less, ": 1 diff_ids for 2 layers"),
        (_no_change, _other_architecture, ": architecture does not match the index (amd64)"),
        (_size_one_more, None, ": the stored bytes have digest sha256:"),
    ],
    ids=["diff-id", "diff-ids-count", "architecture", "layer-size"],
)
def test_verify_says_what_is_wrong_with_an_image_s_configs_and_layers(
    cli: Cli,
    tmp_path: Path,
    edit: Callable[[dict[str, str], list[dict[str, Any]]], None],
    config_edit: Callable[[dict[str, Any]], None] | None,
    problem: str,
) -> None:
    """An image someone else pushed under the lock's name: a config whose diff_ids are not its
    layers, or whose architecture is not the index's, or a layer descriptor of another size, is
    refused by nodes at pull time; verify says so first."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    _repinned(cat, tmp_path / ".modelcar" / "oci", edit, config_edit)
    result = cli("verify", "-c", cat, code=1)
    assert result.stdout.startswith("tiny  FAILED  oci:")
    assert problem in result.stdout, result.stdout


def test_verify_says_a_file_twice_and_a_config_that_cannot_be_read(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"

    def config_again(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("models/config.json")
        info.size = len(FILES["config.json"])
        tf.addfile(info, io.BytesIO(FILES["config.json"]))

    _repinned(cat, layout, lambda platform, layers: layers.append(_tar_layer(layout, config_again)))
    result = cli("verify", "-c", cat, code=1)
    assert "  config.json: in more than one layer\n" in result.stdout

    # a config blob longer than its descriptor, and one of the right size with other bytes: each
    # said of that image, not one error for the whole model
    cli("build", "-c", cat, "--no-cache")
    _, manifests = _image_manifests(layout, "tiny")
    longer, other = (layout / "blobs" / "sha256" / m["config"]["digest"][7:] for m in manifests)
    longer.write_bytes(longer.read_bytes() + b" ")
    other.write_bytes(other.read_bytes().replace(b'"arm64"', b'"arm65"'))
    result = cli("verify", "-c", cat, code=1)
    assert f"config {manifests[0]['config']['digest']}: cannot be read: " in result.stdout
    assert f"config {manifests[1]['config']['digest']}: the stored bytes do not match" in result.stdout


def test_verify_checks_each_platform_on_its_own(cli: Cli, tmp_path: Path) -> None:
    """An arm64 image without the weights is not made whole by the amd64 one's layers."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)

    def drop_weights_on_arm(platform: dict[str, str], layers: list[dict[str, Any]]) -> None:
        if platform["architecture"] == "arm64":
            del layers[1]

    _repinned(cat, tmp_path / ".modelcar" / "oci", drop_weights_on_arm)
    result = cli("verify", "-c", cat, code=1)
    assert "  linux/arm64: model.safetensors: in the lock, missing from the image\n" in result.stdout
    assert "linux/amd64" not in result.stdout


def test_a_platform_image_gone_from_a_store_is_named_by_its_platform(cli: Cli, tmp_path: Path) -> None:
    """Only its digest was said, as if the image itself were gone."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index = _lock(cat)["tiny"]["image"]["digest"]
    (arm,) = [
        m["digest"]
        for m in json.loads((layout / "blobs" / "sha256" / index[7:]).read_bytes())["manifests"]
        if m["platform"]["architecture"] == "arm64"
    ]
    (layout / "blobs" / "sha256" / arm[7:]).unlink()
    result = cli("verify", "-c", cat, code=1)
    assert f"oci:{layout}: tiny@{index}: its linux/arm64 image: oci:{layout}: manifest {arm} not found" in result.stdout


def test_verify_finds_a_link_where_a_file_of_the_lock_should_be(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"

    def link(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("models/config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tf.addfile(info)

    _repinned(cat, layout, lambda _, layers: layers.append(_tar_layer(layout, link)))
    result = cli("verify", "-c", cat, code=1)
    assert "  config.json: a link to /etc/hostname: not a file\n" in result.stdout


def test_verify_reads_the_base_layers_too(cli: Cli, tmp_path: Path) -> None:
    base = tmp_path / "base-layout"
    digest = _base_image(base)
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: oci:{base}:base@{digest}\n")
    cli("build", "-c", cat)
    _, (manifest,) = _image_manifests(tmp_path / ".modelcar" / "oci", "tiny")
    gz = tmp_path / ".modelcar" / "oci" / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    gz.write_bytes(b"\0" * gz.stat().st_size)  # lost: the same size, other bytes
    result = cli("verify", "-c", cat, code=1)
    layer = manifest["layers"][0]["digest"]
    zeros = "sha256:" + hashlib.sha256(b"\0" * gz.stat().st_size).hexdigest()
    assert f"layer {layer}: the stored bytes have digest {zeros} ({gz.stat().st_size} bytes)" in result.stdout


def test_verify_names_files_a_base_put_under_models(cli: Cli, tmp_path: Path) -> None:
    """They are served with the model (a stray *.safetensors would be loaded as weights): said as
    the base's, with what to do, not as if the build had put them there."""
    base = tmp_path / "base-layout"
    digest = _base_image(base, extra={"models/README.md": b"base's own\n"})
    cat = _catalog(tmp_path, f"  - name: tiny\n    path: ./m\n    base: oci:{base}:base@{digest}\n")
    cli("build", "-c", cat)
    _, (manifest,) = _image_manifests(tmp_path / ".modelcar" / "oci", "tiny")
    result = cli("verify", "-c", cat, code=1)
    assert result.stdout.splitlines()[1:] == [
        f"  README.md: in the base image's layer {manifest['layers'][0]['digest']}, not in the lock: vLLM would "
        "read it with the model; pick a base with nothing under /models"
    ]


def test_a_mirror_into_another_tool_s_layout_keeps_what_its_index_says(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    doc = {"schemaVersion": 2, "manifests": [], "annotations": {"org.example.mirror": "site-b"}}
    (theirs / "index.json").write_text(json.dumps(doc))
    cli("mirror", "-c", cat, "--to", f"oci:{theirs}")
    index = json.loads((theirs / "index.json").read_text())
    assert index["annotations"] == {"org.example.mirror": "site-b"}
    assert [m["annotations"][ANN_REF] for m in index["manifests"]] == ["tiny"]


def test_a_local_registry_is_reached_directly_whatever_the_proxy_variables_say(
    cli: Cli, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As docker and skopeo have it: loopback traffic (a local registry's credentials with it)
    never goes to the proxy the environment names, here one where nothing listens."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
        monkeypatch.setenv(name.lower(), "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    cat = _catalog(tmp_path)
    assert registry.host.startswith("127.0.0.1:")
    cli("build", "-c", cat, "--push", "--registry", f"{registry.host}/proxied")
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_no_cache_writes_again_every_blob_of_a_damaged_layout(cli: Cli, tmp_path: Path) -> None:
    """Small files only (their layer's digest is known before it is written) and a damaged
    config: blobs of the right size and the wrong bytes, each written again by --no-cache."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    _, manifests = _image_manifests(layout, "m")
    for desc in (manifests[0]["layers"][0], manifests[0]["config"]):
        blob = layout / "blobs" / "sha256" / desc["digest"][7:]
        blob.write_bytes(b" " * blob.stat().st_size)
    assert "FAILED" in cli("verify", "-c", cat, code=1).stdout
    cli("build", "-c", cat, "--no-cache")
    assert cli("verify", "-c", cat).stdout == "m  ok\n"


def test_a_mirror_into_another_tool_s_archive_keeps_what_its_index_says(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    archive = tmp_path / "theirs.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps({"schemaVersion": 2, "manifests": [], "annotations": {"site": "b"}}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}")
    with tarfile.open(archive) as tf:
        f = tf.extractfile("index.json")
        assert f is not None
        index = json.load(f)
    assert index["annotations"] == {"site": "b"} and len(index["manifests"]) == 1


@pytest.mark.parametrize(
    "index", ["[]", '{"manifests": {"a": 1}}', '{"manifests": ["x"]}', '{"manifests": [{"annotations": "x"}]}']
)
def test_an_archive_whose_index_is_not_one_is_said_so(cli: Cli, tmp_path: Path, index: str) -> None:
    archive = tmp_path / "odd.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("index.json")
        info.size = len(index)
        tf.addfile(info, io.BytesIO(index.encode()))
    result = cli("inspect", f"oci-archive:{archive}:m", code=1)
    assert result.stderr.startswith(f"error: oci-archive:{archive}: index.json: not a valid OCI index (")
    assert "Traceback" not in result.stderr


def test_a_layout_in_a_directory_with_colons_is_read_by_digest(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    digest = _lock(cat)["tiny"]["image"]["digest"]
    stamped = tmp_path / "2024-01-01T10:00"
    shutil.copytree(tmp_path / ".modelcar" / "oci", stamped)
    assert json.loads(cli("inspect", f"oci:{stamped}@{digest}", "--json").stdout)["digest"] == digest


def test_two_writers_of_one_archive_keep_each_others_images(tmp_path: Path) -> None:
    import threading
    import time

    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "models.tar"

    def write(name: str, hold: float) -> None:
        with ArchiveStore(archive, write=True) as store:
            data = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [], "name": name}).encode()
            store.put_manifest(name, data, MEDIA_INDEX, ref=name)
            time.sleep(hold)  # the other writer opens meanwhile

    first = threading.Thread(target=write, args=("model-one", 0.5))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=write, args=("model-two", 0.0))
    second.start()
    first.join()
    second.join()
    with ArchiveStore(archive) as store:
        names = sorted(json.loads(store.get_manifest(n, n))["name"] for n in ("model-one", "model-two"))
    assert names == ["model-one", "model-two"]


def test_verify_from_a_layout_checks_the_name_a_node_loads_the_image_by(cli: Cli, tmp_path: Path) -> None:
    """`verify --from` read the lock's digest straight from the blobs: a layout whose index.json
    no longer names the image (or names another) passed, and `skopeo copy oci:DIR:NAME` on the
    air-gapped side found nothing. The name is checked; a mirror names it again."""
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n  - name: other\n    path: ./o\n")
    _model(tmp_path / "o", {"config.json": b'{"other": true}'})
    cli("build", "-c", cat)
    copy = tmp_path / "copy"
    cli("mirror", "-c", cat, "--to", f"oci:{copy}")
    cli("verify", "-c", cat, "--from", f"oci:{copy}")
    index = json.loads((copy / "index.json").read_text())
    digests = {m["annotations"][ANN_REF]: m["digest"] for m in index["manifests"]}
    index["manifests"] = [m for m in index["manifests"] if m["annotations"][ANN_REF] != "tiny"]
    index["manifests"][0]["annotations"][ANN_REF] = "tiny"  # the name on other's image; other has none
    (copy / "index.json").write_text(json.dumps(index))

    result = cli("verify", "-c", cat, "--from", f"oci:{copy}", "--json", code=1)
    found = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    again = f"`modelcar mirror --to oci:{copy} -c {cat}` names it again"
    other, mine = digests["other"], digests["tiny"]
    assert found["tiny"]["problems"] == [
        f"oci:{copy}: tiny (what a node loads it by) names {other}, not the lock's {mine}: {again}"
    ]
    assert found["other"]["problems"] == [f"oci:{copy}: other (what a node loads it by) names no image: {again}"]
    assert not found["tiny"]["damaged"] and not found["other"]["damaged"]  # the images are whole
    cli("verify", "-c", cat)  # the build's own layout names both
    cli("mirror", "-c", cat, "--to", f"oci:{copy}")
    cli("verify", "-c", cat, "--from", f"oci:{copy}")


def test_verify_from_a_registry_asks_no_tag(cli: Cli, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A registry's images are pulled by digest and its tags move with later builds: verify reads
    what the lock pins and asks no tag (a pull-through cache that cannot resolve tags, its
    upstream out of reach, failed an image it had checked whole)."""
    cat = _catalog(tmp_path)
    prefix = f"{fault_proxy.host}/tags"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    fault_proxy.clear()
    fault_proxy.inject(Fault(r"/manifests/([0-9a-f]{12}|stable)$", "HEAD", times=100))
    cli("verify", "-c", cat, "--from", prefix, "--max-retries", "0")
    assert fault_proxy.count("HEAD", r"/manifests/([0-9a-f]{12}|stable)$") == 0


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_a_damaged_mirror_is_mended_by_mirroring_it_again_with_no_cache(cli: Cli, tmp_path: Path, kind: str) -> None:
    """A layer that rotted in an air-gap copy: `verify --from` finds it, and a mirror again said
    "already in" (it holds the image's names and blobs) and left it so. `--no-cache` writes every
    blob again; verify says so."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    dest = f"{kind}:{tmp_path / ('copy' if kind == 'oci' else 'copy.tar')}"
    cli("mirror", "-c", cat, "--to", dest)
    weights = _lock(cat)["tiny"]["image"]["digest"]  # the largest blob: the weights' layer
    with open_store(dest) as store:
        image = read_image(store, "tiny", weights)
        largest = max(image.blobs(), key=lambda b: b.size)
    where = tmp_path / "copy" / "blobs" / "sha256" / largest.digest[7:] if kind == "oci" else tmp_path / "copy.tar"
    offset = 0
    if kind == "oci-archive":
        with tarfile.open(where) as tf:
            offset = tf.getmember(f"blobs/sha256/{largest.digest[7:]}").offset_data
    with where.open("r+b") as f:  # one byte rots
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 1]))

    result = cli("verify", "-c", cat, "--from", dest, code=1)
    assert f"`modelcar mirror --to {dest} --no-cache tiny -c {cat}`" in result.stderr
    assert "already in" in cli("mirror", "-c", cat, "--to", dest).stderr
    cli("verify", "-c", cat, "--from", dest, code=1)  # as it was
    cli("mirror", "-c", cat, "--to", dest, "--no-cache")
    cli("verify", "-c", cat, "--from", dest)
    assert "--no-cache: for oci:DIR and oci-archive:FILE destinations" in (
        cli("mirror", "-c", cat, "--to", "127.0.0.1:9/x", "--no-cache", code=2).stderr
    )


def test_a_mirror_into_a_layout_that_holds_the_image_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    """index.json was replaced (a new inode) by every mirror, also when it named the same images:
    a layout on read-only media, or another user's, failed a mirror that had nothing to do."""
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    copy = tmp_path / "copy"
    cli("mirror", "-c", cat, "--to", f"oci:{copy}")
    index = copy / "index.json"
    written = index.stat()
    cli("mirror", "-c", cat, "--to", f"oci:{copy}")
    assert (index.stat().st_ino, index.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def test_an_archive_holding_what_a_mirror_brings_is_left_as_it_is(tmp_path: Path) -> None:
    """A mirror of a model the archive already holds, not the last by name, rewrote the whole
    archive on every run (its index entry moved to the end): an air-gap archive of hundreds of GB
    copied, and needing as much free space, to change nothing."""
    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "models.tar"
    docs = {
        name: json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [], "name": name}).encode()
        for name in ("model-a", "model-b")
    }
    with ArchiveStore(archive, write=True) as store:
        for name, data in docs.items():
            store.put_manifest(name, data, MEDIA_INDEX, ref=name)
    before = archive.stat()
    with ArchiveStore(archive, write=True) as store:
        store.put_manifest("model-a", docs["model-a"], MEDIA_INDEX, ref="model-a")
    after = archive.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_archive_on_media_that_take_no_new_file_takes_a_mirror_that_brings_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An air-gap archive on read-only media: a mirror of what it holds failed on the writer lock
    file it could not make beside it; one that brings something new still fails, naming that file."""
    import errno

    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "models.tar"
    doc = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [], "name": "a"}).encode()
    with ArchiveStore(archive, write=True) as store:
        store.put_manifest("model-a", doc, MEDIA_INDEX, ref="model-a")
    (tmp_path / "models.tar.lock").unlink()
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".lock") and flags & os.O_CREAT:  # what root cannot be made to see by chmod
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    before = archive.stat()
    with ArchiveStore(archive, write=True) as store:
        store.put_manifest("model-a", doc, MEDIA_INDEX, ref="model-a")
    assert (archive.stat().st_ino, archive.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (tmp_path / "models.tar.lock").exists()
    with pytest.raises(OSError, match="Read-only file system"), ArchiveStore(archive, write=True) as store:
        store.put_manifest("model-b", doc.replace(b'"a"', b'"b"'), MEDIA_INDEX, ref="model-b")


def test_a_damaged_blob_of_an_archive_is_not_carried_into_the_rewritten_one(tmp_path: Path) -> None:
    """Adding an image rewrites the archive, copying what its images use of what it held: a blob
    whose bytes no longer match its name was copied on as good."""
    import tarfile

    from modelcar.errors import ModelcarError
    from modelcar.image import MEDIA_LAYER
    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "models.tar"
    old, config = b"weights" * 1000, b"{}"
    layer, cfg = ({"digest": digest_of(b), "size": len(b)} for b in (old, config))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
            "layers": [{"mediaType": MEDIA_LAYER, **layer}],
        }
    ).encode()
    with ArchiveStore(archive, write=True) as store:
        for blob in (old, config):
            store.put_blob("one", len(blob), lambda blob=blob: [blob], digest_of(blob))
        store.put_manifest("one", manifest, MEDIA_MANIFEST, ref="one")
    with tarfile.open(archive) as tf:
        member = tf.getmember("blobs/sha256/" + hashlib.sha256(old).hexdigest())
    with archive.open("r+b") as f:  # one byte of it rots on disk
        f.seek(member.offset_data + 10)
        f.write(b"X")
    damaged = archive.read_bytes()
    new = b"more weights"
    store = ArchiveStore(archive, write=True)
    store.put_blob("two", len(new), lambda: [new], "sha256:" + hashlib.sha256(new).hexdigest())
    with pytest.raises(
        ModelcarError, match=r"not written: blobs/sha256/\w+ in the archive is damaged \(its bytes give"
    ):
        store.close()
    assert archive.read_bytes() == damaged  # left as it was, nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.tar", "models.tar.lock"]
    # only a name added (the blobs are there already): the rewrite happens at close, and fails there
    store = ArchiveStore(archive, write=True)
    store.put_manifest("one", manifest, MEDIA_MANIFEST, ref="again")
    with pytest.raises(ModelcarError, match="in the archive is damaged"):
        store.close()
    assert archive.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.tar", "models.tar.lock"]


def test_an_archive_rewritten_carries_only_what_its_images_use(cli: Cli, tmp_path: Path) -> None:
    """A model pinned anew and mirrored into the same air-gap archive: the old pin's weights were
    carried into every later archive (each `lock --update` one more copy of them to ship), with
    the blobs of a model that failed midway. What no image of the index uses is left out; what
    another tool's entry names is kept."""
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n  - name: other\n    path: ./o\n")
    _model(tmp_path / "o", {"config.json": b'{"other": true}'})
    cli("build", "-c", cat)
    archive = tmp_path / "air-gap.tar"
    cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}")
    with tarfile.open(archive) as tf:
        before = {m.name for m in tf.getmembers() if m.name.startswith("blobs/")}
    old = _lock(cat)["tiny"]["image"]["digest"]
    weights = next(p for p in (tmp_path / "m").rglob("*.safetensors"))
    weights.write_bytes(b"new weights" * 1000)
    cli("lock", "-c", cat, "--update")
    cli("build", "-c", cat)
    cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}")
    new = _lock(cat)["tiny"]["image"]["digest"]
    assert new != old
    with tarfile.open(archive) as tf:
        after = {m.name for m in tf.getmembers() if m.name.startswith("blobs/")}
    old_weights = "blobs/sha256/" + hashlib.sha256(FILES[weights.relative_to(tmp_path / "m").as_posix()]).hexdigest()
    from modelcar.stores import read_image
    from modelcar.stores.archive import ArchiveStore

    with ArchiveStore(archive) as store:
        used = set()
        for model in ("tiny", "other"):
            image = read_image(store, model, model)
            used |= {image.digest, *(d.digest for d, _ in image.manifests), *(b.digest for b in image.blobs())}
    assert after == {"blobs/sha256/" + d.removeprefix("sha256:") for d in used}  # nothing else
    assert f"blobs/sha256/{old.removeprefix('sha256:')}" in before - after
    assert old_weights not in after  # the layer is a tar of it: not the file's digest, but neither is kept
    cli("verify", "-c", cat, "--from", f"oci-archive:{archive}")
    skopeo = require_tool("skopeo")
    for model in ("tiny", "other"):
        subprocess.run([skopeo, "inspect", "--raw", f"oci-archive:{archive}:{model}"], capture_output=True, check=True)


def _archive_image(store: Any, ref: str, layer: bytes, odd_layer: str | None = None) -> set[str]:
    """An image put into an archive store as another tool would have it: the blob names it uses."""
    from modelcar.image import MEDIA_LAYER

    layer_desc = {"mediaType": MEDIA_LAYER, "digest": odd_layer or digest_of(layer), "size": len(layer)}
    config = json.dumps({"ref": ref, "layer": layer_desc["digest"]}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [layer_desc],
        }
    ).encode()
    for blob in (config, *([] if odd_layer else [layer])):
        store.put_blob(ref, len(blob), lambda blob=blob: [blob], digest_of(blob))
    store.put_manifest(ref, manifest, MEDIA_MANIFEST, ref=ref)
    return {f"blobs/sha256/{digest_of(b)[7:]}" for b in (config, manifest, *([] if odd_layer else [layer]))}


def test_a_rewritten_archive_keeps_what_another_tool_s_entries_use(tmp_path: Path) -> None:
    """What the final index's images use is kept, another tool's too; with an entry it cannot read
    through (a sha512 layer), everything is."""
    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "a.tar"

    def members() -> set[str]:
        with tarfile.open(archive) as tf:
            return {m.name for m in tf.getmembers() if m.name.startswith("blobs/")}

    with ArchiveStore(archive, write=True) as store:
        old = _archive_image(store, "mine", b"old weights")
        theirs = _archive_image(store, "theirs", b"their weights")
    with ArchiveStore(archive, write=True) as store:
        new = _archive_image(store, "mine", b"new weights")
    assert members() == new | theirs  # the old pin's manifest, config and layer are not carried
    with ArchiveStore(archive, write=True) as store:
        odd = _archive_image(store, "odd", b"elsewhere", odd_layer="sha512:" + "0" * 128)
    with ArchiveStore(archive, write=True) as store:
        newer = _archive_image(store, "mine", b"newer weights")
    assert members() == new | theirs | odd | newer  # "odd" is not read through: nothing is left out
    assert old.isdisjoint(members())


def test_an_interrupt_while_an_archive_carries_its_blobs_over_is_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The carry-over runs at close, where a cancelled CI job's signal lands on a large archive: it
    was said as the archive's error (with no reason), and a library caller catching ModelcarError
    swallowed the Ctrl-C."""
    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "a.tar"
    with ArchiveStore(archive, write=True) as store:
        _archive_image(store, "theirs", b"their weights")
    before = archive.read_bytes()
    store = ArchiveStore(archive, write=True)
    _archive_image(store, "mine", b"weights")

    def interrupted(*_: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(ArchiveStore, "_read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    assert archive.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "a.tar.lock"]  # no partial file


def test_verify_says_a_whiteout_an_older_lock_let_into_the_image() -> None:
    """Built before `lock` refused them: the layer holds the file and matches the lock, and the pod
    still lacks it (the runtime applies it as a deletion)."""
    from modelcar.image import ANN_LAYER_KEY, MEDIA_LAYER, Descriptor
    from modelcar.lock import LockedFile, LockedModel
    from modelcar.verify import Verified, _against_lock, _Layer

    sha = hashlib.sha256(b"{}").hexdigest()
    files = [LockedFile(path=p, size=2, sha256=sha) for p in ("config.json", "sub/.wh..wh..opq")]
    entry = LockedModel(source="hf://org/m", revision="main", commit="c" * 40, files=files)
    layer = Descriptor(MEDIA_LAYER, "sha256:" + "a" * 64, 3072, {ANN_LAYER_KEY: "k"})
    read = _Layer(files={f.path: (2, sha) for f in files})
    problems = _against_lock(entry, [(layer, read)])
    assert problems == [
        "sub/.wh..wh..opq: a name starting with '.wh.' is a whiteout in image layers (runtimes delete it): "
        'lock again with `exclude: [".wh.*", "*/.wh.*"]` and build'
    ]
    # not for `build --no-cache` to mend (the lock refuses the model until it is excluded), unless
    # something else is wrong with the image too
    assert not Verified("oci:x", problems).damaged
    assert Verified("oci:x", [*problems, "config.json: in the lock, missing from the image"]).damaged


def test_verify_reads_a_layer_two_models_share_once(
    cli: Cli, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two entries of one model (a pinned one and a canary, the shards unchanged) share layers: a
    layout keeps each blob once, and verify read it once for each model (twice the hours for a
    100 GB model). A registry answers per repository: each repository's copy is read."""
    from modelcar import api, verify

    cat = _catalog(tmp_path, "  - name: a\n    path: ./m\n  - name: b\n    path: ./m\n")
    cli("build", "-c", cat)
    reads: list[str] = []
    read_blob = verify.read_blob

    def counted(store: Any, repo: str, desc: Any) -> Any:
        reads.append(f"{repo}@{desc.digest}")
        return read_blob(store, repo, desc)

    monkeypatch.setattr(verify, "read_blob", counted)
    report = api.verify(cat)
    assert {name: v.problems for name, v in report.items()} == {"a": [], "b": []}
    lock = _lock(cat)
    manifests = {
        name: json.loads(cli("inspect", f"oci:{tmp_path / '.modelcar' / 'oci'}:{name}", "--json").stdout)
        for name in ("a", "b")
    }
    shared = {layer["digest"] for layer in manifests["a"]["layers"]} & {
        layer["digest"] for layer in manifests["b"]["layers"]
    }
    assert shared and lock["a"]["image"]["digest"] != lock["b"]["image"]["digest"]  # two images, shared layers
    layer_reads = [r.split("@", 1)[1] for r in reads if r.split("@", 1)[1] in shared]
    assert sorted(layer_reads) == sorted(shared), reads  # each once, whichever model read it
    # damaged, it is damaged in both images
    weights = max(manifests["a"]["layers"], key=lambda layer: layer["size"])["digest"]
    blob = tmp_path / ".modelcar" / "oci" / "blobs" / "sha256" / weights[7:]
    blob.write_bytes(bytes(blob.stat().st_size))
    report = api.verify(cat)
    for name in ("a", "b"):
        assert report[name].damaged and any(
            p.startswith(f"layer {weights}: the stored bytes") for p in report[name].problems
        )
    # a registry: each repository's copy
    prefix = f"{registry.host}/{registry.unique_repo('shared')}"
    cli("build", "-c", cat, "--no-cache", "--push", "--registry", prefix)
    # one image's descriptor of the shared layer gives it another size: that image's read says so,
    # whichever image's read of the layer came first
    from modelcar.image import MEDIA_INDEX, MEDIA_MANIFEST
    from modelcar.stores.layout import LayoutStore

    cli("build", "-c", cat, "--no-cache")  # the layout's damaged copy written anew
    layout = LayoutStore(tmp_path / ".modelcar" / "oci")
    index = json.loads(layout.get_manifest("b", "b"))
    manifest = json.loads(layout.get_manifest("b", index["manifests"][0]["digest"]))
    wrong = next(layer for layer in manifest["layers"] if layer["digest"] == weights)
    wrong["size"] += 1
    data = json.dumps(manifest).encode()
    index["manifests"] = [
        {**index["manifests"][0], "digest": layout.put_manifest("b", data, MEDIA_MANIFEST), "size": len(data)}
    ]
    index_digest = layout.put_manifest("b", json.dumps(index).encode(), MEDIA_INDEX, ref="b")
    lock_text = cat.with_suffix(".lock").read_text()
    cat.with_suffix(".lock").write_text(lock_text.replace(_lock(cat)["b"]["image"]["digest"], index_digest))
    report = api.verify(cat)
    assert report["a"].problems == [] and any(weights in p for p in report["b"].problems), report["b"].problems
    cat.with_suffix(".lock").write_text(lock_text)
    reads.clear()
    report = api.verify(cat, source=prefix)
    assert {name: v.problems for name, v in report.items()} == {"a": [], "b": []}
    assert sorted(r for r in reads if r.endswith(weights)) == sorted(
        f"{repo}@{weights}" for repo in (f"{prefix.split('/', 1)[1]}/a", f"{prefix.split('/', 1)[1]}/b")
    )


def test_verify_reports_a_layer_the_registry_lost(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    prefix = f"{registry.host}/{registry.unique_repo('lost')}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    v2 = registry.root / "docker" / "registry" / "v2"
    links = v2 / "repositories" / prefix.split("/", 1)[1] / "tiny" / "_layers" / "sha256"
    # the repository's link to its largest blob (the weights' layer) goes: its GET answers 404 BLOB_UNKNOWN
    lost = max(links.iterdir(), key=lambda d: (v2 / "blobs" / "sha256" / d.name[:2] / d.name / "data").stat().st_size)
    (lost / "link").unlink()
    result = cli("verify", "-c", cat, "--from", prefix, "--json", code=1)
    problems = json.loads(result.stdout)["models"][0]["problems"]  # a report, not a traceback
    assert [p for p in problems if "BLOB_UNKNOWN" in p] == problems, problems  # nothing said missing
    assert problems[0].startswith(f"layer sha256:{lost.name}: cannot be read: "), problems


def _pushed_with_a_cut(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path, name: str
) -> tuple[Path, str, Any]:
    """The test model pushed under a new prefix, and the proxy set to cut the first GET of its
    weights layer halfway: (catalog, prefix, the fault)."""
    cat = _catalog(tmp_path)
    prefix = registry.unique_repo(name)
    cli("build", "-c", cat, "--push", "--registry", f"{registry.host}/{prefix}")
    layers = json.loads(cli("inspect", f"{registry.host}/{prefix}/tiny:stable", "--json").stdout)["layers"]
    weights = next(layer for layer in layers if layer["size"] > LARGE_FILE)["digest"]
    return cat, prefix, fault_proxy.cut("GET", f"/blobs/{weights}$", after_bytes=LARGE_FILE // 2)


@pytest.mark.parametrize("to", ["oci", "oci-archive"])
def test_mirror_from_a_registry_survives_a_transfer_cut_midway(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path, to: str
) -> None:
    cat, prefix, big = _pushed_with_a_cut(cli, registry, fault_proxy, tmp_path, "cut")
    target = f"{to}:{tmp_path / ('mirror' if to == 'oci' else 'mirror.tar')}"
    result = cli("mirror", "-c", cat, "--from", f"{fault_proxy.host}/{prefix}", "--to", target)
    assert big.hits == 1 and "retry" in result.stderr
    assert cli("verify", "-c", cat, "--from", target).stdout == "tiny  ok\n"


def test_verify_reads_a_layer_again_when_its_transfer_is_cut_midway(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    cat, prefix, big = _pushed_with_a_cut(cli, registry, fault_proxy, tmp_path, "vcut")
    result = cli("verify", "-c", cat, "--from", f"{fault_proxy.host}/{prefix}")
    assert result.stdout == "tiny  ok\n" and big.hits == 1 and "retry" in result.stderr


@pytest.mark.parametrize("to", ["oci", "oci-archive"])
def test_mirror_from_a_registry_that_keeps_cutting_gives_up_in_one_line(
    cli: Cli, registry: Registry, fault_proxy: FaultProxy, tmp_path: Path, to: str
) -> None:
    cat = _catalog(tmp_path)
    prefix = registry.unique_repo("cuts")
    cli("build", "-c", cat, "--push", "--registry", f"{registry.host}/{prefix}")
    fault_proxy.cut("GET", "/blobs/sha256:", after_bytes=1000, times=100)
    target = tmp_path / ("mirror" if to == "oci" else "mirror.tar")
    result = cli(
        "mirror",
        "-c",
        cat,
        "--from",
        f"{fault_proxy.host}/{prefix}",
        "--to",
        f"{to}:{target}",
        "--max-retries",
        "1",
        code=1,
    )
    error = [line for line in result.stderr.splitlines() if not line.startswith("modelcar: ")]
    assert len(error) == 1 and error[0].startswith("error: ") and "still failing after 2 attempts" in error[0], (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("https://u:s3cret@127.0.0.1:5000/mc/tiny:latest", "credentials do not go in a registry name"),
        ("https://u:s3c/ret@127.0.0.1:5000/mc/tiny:1", "credentials do not go in a registry name"),
        ("u:s3c/ret@127.0.0.1:5000/mc/tiny@sha256:" + "0" * 64, "credentials do not go in a registry name"),
        ("u:s3cret@127.0.0.1:5000/mc/tiny@sha256:" + "0" * 64, "credentials do not go in a registry name"),
        ("oci:lay@sha256:1234", "'sha256:1234' after @ is not a digest"),
        ("127.0.0.1:5000/mc/tiny@sha256:1234", "'sha256:1234' after @ is not a digest"),
        ("127.0.0.1:5000/mc/tiny:v1@md5:abc", "'md5:abc' after @ is not a digest"),
        ("u:s3c/ret@127.0.0.1:5000", "after @ is not a digest"),  # no repository: the secret still stays out
    ],
)
def test_a_bad_image_reference_is_one_line_and_exit_2(cli: Cli, tmp_path: Path, ref: str, message: str) -> None:
    result = cli("inspect", ref, code=2)
    assert message in result.stderr and "s3cret" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("name", ["nosuch", ""])
def test_inspect_of_a_model_the_catalog_lacks_says_so(cli: Cli, tmp_path: Path, name: str) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    result = cli("inspect", "-c", cat, name, code=2)
    assert f"{cat}: no model named {name!r}; the catalog has: tiny" in result.stderr


def test_mirror_copies_the_other_models_when_one_fails(cli: Cli, tmp_path: Path) -> None:
    _model(tmp_path / "m2", {"config.json": b'{"model_type": "other"}\n'})
    cat = _catalog(tmp_path, "  - name: tiny\n    path: ./m\n  - name: other\n    path: ./m2\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    index = json.loads((layout / "blobs" / "sha256" / _lock(cat)["tiny"]["image"]["digest"][7:]).read_bytes())
    (layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).unlink()  # tiny cannot be read
    archive = tmp_path / "out" / "m.tar"
    result = cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}", code=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: tiny: "), result.stderr
    assert result.stdout.startswith("other  sha256:")
    assert cli("verify", "-c", cat, "--from", f"oci-archive:{archive}", "other").stdout == "other  ok\n"


def _weights_blob(layout: Path, digest: str) -> tuple[dict[str, Any], Path]:
    """The descriptor of the image's weights layer in a layout, and its blob file."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((blobs / digest[7:]).read_bytes())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    big = next(layer for layer in manifest["layers"] if layer["size"] > LARGE_FILE)
    return big, blobs / big["digest"][7:]


@pytest.mark.parametrize("step", ["rewind", "sync"])
def test_an_archive_that_cannot_be_finished_says_why_and_why_models_failed(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The disk fills up under the archive: the failed member cannot be cut off again (rewind), or
    the finished archive cannot be flushed (sync); what the other models put in it is not kept
    either, and the error says both why a model failed and why the archive was not written."""
    import errno

    from modelcar import fsutil

    _model(tmp_path / "m2", {"config.json": b'{"model_type": "other"}\n'})
    cat = _catalog(tmp_path, "  - name: other\n    path: ./m2\n  - name: tiny\n    path: ./m\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    _, blob = _weights_blob(layout, _lock(cat)["tiny"]["image"]["digest"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))  # tiny's weights fail their digest as the archive takes them

    def full(self: object, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for writer in (fsutil.WriteBehind, fsutil.DirectWriter):  # on a local disk, through a network one
        monkeypatch.setattr(writer, step, full)
    archive = tmp_path / "out" / "m.tar"
    result = cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}", code=1)
    doc = json.loads(cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}", "--json", code=1).stdout)
    assert doc["models"] == [] and sorted(f["name"] for f in doc["failed"]) == ["other", "tiny"]  # none kept
    errors = result.stderr[result.stderr.index("error: ") :]
    # tiny's error is its damaged blob, or (for a blob of it put after that one) the broken archive,
    # which names that blob's failure too
    first = errors.splitlines()[0]
    assert first.startswith("error: tiny: ")
    assert "does not read back as itself" in first or ("which failed: " in first and "the source gave" in first), first
    assert f"oci-archive:{archive}: not written: {archive}: No space left on device" in errors
    assert not archive.exists()


def test_a_damaged_source_blob_is_blamed_on_the_source(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    big, blob = _weights_blob(layout, _lock(cat)["tiny"]["image"]["digest"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    result = cli("mirror", "-c", cat, "--to", f"oci:{tmp_path / 'copy'}", code=1)
    assert f"error: tiny: oci:{layout}: blob {big['digest']} does not read back as itself" in result.stderr
    assert "the copy there is damaged" in result.stderr


def test_a_short_source_into_an_archive_is_one_line_naming_the_blob(cli: Cli, tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    big, blob = _weights_blob(layout, _lock(cat)["tiny"]["image"]["digest"])
    blob.write_bytes(blob.read_bytes()[:5000])
    archive = tmp_path / "out" / "m.tar"
    result = cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}", code=1)
    assert result.stderr.strip() == (
        f"error: tiny: oci-archive:{archive}: blob {big['digest']}: the source ended after 5000 of {big['size']} bytes"
    )
    assert [p.name for p in archive.parent.iterdir()] == ["m.tar.lock"]  # the writers' lock; nothing half-written


def test_an_archive_given_up_does_not_wait_for_a_blob_in_the_middle_of_its_copy(tmp_path: Path) -> None:
    """close(commit=False) is how an interrupt gives an archive up; a blob's copy (a registry's slow
    answer) holds the archive's lock, and the close waited for it until the grace timer ended the
    process. It returns at once; the new file is never put in place of the archive."""
    from modelcar.errors import ModelcarError
    from modelcar.stores.archive import ArchiveStore

    archive = tmp_path / "a.tar"
    store = ArchiveStore(archive, write=True)
    started, release = threading.Event(), threading.Event()
    safety = threading.Timer(60, release.set)  # a close that waits returns only after this
    safety.start()

    def slow() -> Iterator[bytes]:
        yield b"a" * 512
        started.set()
        release.wait()
        yield b"b" * 512

    blob = b"a" * 512 + b"b" * 512

    def put() -> None:
        with contextlib.suppress(Exception):  # the file it wrote into is gone: its error is no matter
            store.put_blob("r", len(blob), slow, digest_of(blob))

    worker = threading.Thread(target=put)
    worker.start()
    try:
        assert started.wait(60)
        store.close(commit=False)
        assert not release.is_set()  # returned while the copy still waits
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.lock"]  # the partial file's name gone
    finally:
        release.set()
        safety.cancel()
        worker.join(60)
    assert not archive.exists()
    assert store._file is None  # and the copy, done, let it go (a library caller's process goes on)
    with pytest.raises(ModelcarError, match="given up"):
        store.put_blob("r", len(blob), lambda: [blob], digest_of(blob))


def test_a_model_whose_copy_into_an_archive_fails_takes_its_blobs_with_it(cli: Cli, tmp_path: Path) -> None:
    """The archive keeps the models that went in, not the blobs of one that failed halfway: those
    went to the air gap unnamed (a 25 MB layer in a 3 MB archive), and filled the disk another
    model needed. Blobs the good model shares are kept."""
    _model(tmp_path / "good", {"config.json": b'{"good": 1}', "model.safetensors": os.urandom(LARGE_FILE)})
    _model(tmp_path / "bad", {"config.json": b'{"good": 1}', "model.safetensors": os.urandom(LARGE_FILE)})
    cat = _catalog(tmp_path, "  - name: bad\n    path: ./bad\n  - name: good\n    path: ./good\n")
    cli("build", "-c", cat)
    layout = tmp_path / ".modelcar" / "oci"
    _, (bad, _) = _image_manifests(layout, "bad")
    (layout / "blobs" / "sha256" / bad["layers"][-1]["digest"][7:]).unlink()  # the weights: copied after the rest
    archive = tmp_path / "out.tar"
    result = cli("mirror", "-c", cat, "--to", f"oci-archive:{archive}", code=1)
    assert result.stdout.startswith("good  sha256:") and "bad: " in result.stderr
    index, manifests = _image_manifests(layout, "good")
    refs = json.loads((layout / "index.json").read_text())["manifests"]
    entry = next(m for m in refs if m["annotations"]["org.opencontainers.image.ref.name"] == "good")
    good = {entry["digest"], *(m["digest"] for m in index["manifests"])}
    good |= {d["digest"] for m in manifests for d in [m["config"], *m["layers"]]}
    with tarfile.open(archive) as tf:
        blobs = {"sha256:" + n.rsplit("/", 1)[1] for n in tf.getnames() if n.startswith("blobs/")}
    assert blobs == good
    assert bad["layers"][0]["digest"] in good  # the config.json layer both have: kept for the good one
    cli("verify", "-c", cat, "--from", f"oci-archive:{archive}", "good")
