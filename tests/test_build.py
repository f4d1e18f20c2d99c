"""`modelcar build` end to end: fake Hub -> real huggingface_hub -> layout read by skopeo and umoci."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcar import build as build_module
from modelcar import checked
from modelcar.checked import STAMP
from modelcar.fsutil import Chunk
from modelcar.image import LARGE_FILE
from modelcar.tarlayer import Member
from tests.conftest import Cli, require_tool, run_module, write_catalog
from tests.fakehub import FakeHub
from tests.registry import Registry

BIG = bytes(range(256)) * (LARGE_FILE // 256) + b"!" * 1000  # just over 16 MiB: a layer of its own
FILES = {
    "config.json": b'{"model_type": "qwen2"}\n',
    "generation_config.json": b'{"max_new_tokens": 8}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {}}\n',
    "chat/template.jinja": b"{{ messages }}\n",
    "model-00001-of-00002.safetensors": BIG,
    "model-00002-of-00002.safetensors": b"\x07" * 5000,
    "pytorch_model.bin": b"never shipped" * 100,
}
SHIPPED = sorted(p for p in FILES if not p.endswith(".bin"))
CATALOG = """\
defaults:
  include: ["*.json", "*.safetensors", "*.jinja"]
models:
  - name: tiny
    hf: org/tiny
"""


def _lock(path: Path) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(path.read_text())


def _setup(fake_hub: FakeHub, tmp_path: Path, catalog: str = CATALOG) -> Path:
    fake_hub.add_repo("org/tiny", FILES)
    return write_catalog(tmp_path / "catalog.yaml", catalog)


def test_source_date_epoch_sets_every_file_time_and_so_the_digest(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproducible-builds convention: a build that sets SOURCE_DATE_EPOCH gets that time on
    every tar member, and so other digests; one that does not, the epoch."""
    fake_hub.add_repo("org/tiny", FILES)
    digests = {}
    for epoch in ("", "1700000000"):
        cat = write_catalog(tmp_path / (epoch or "unset") / "catalog.yaml", CATALOG)
        monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
        cli("build", "-c", cat)
        digests[epoch] = image = _lock(cat.with_suffix(".lock"))["models"]["tiny"]["image"]["digest"]
        blobs = cat.parent / ".modelcar" / "oci" / "blobs" / "sha256"
        index = json.loads((blobs / image.removeprefix("sha256:")).read_bytes())
        manifest = json.loads((blobs / index["manifests"][0]["digest"].removeprefix("sha256:")).read_bytes())
        mtimes = set()
        for layer in manifest["layers"]:
            with tarfile.open(blobs / layer["digest"].removeprefix("sha256:")) as tar:
                mtimes |= {member.mtime for member in tar.getmembers()}
        assert mtimes == {int(epoch or 0)}
    assert digests[""] != digests["1700000000"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    result = cli("build", "-c", cat, "--update", code=2)
    assert "SOURCE_DATE_EPOCH='yesterday' is not an integer number of seconds" in result.stderr


def test_build_is_read_by_skopeo_and_umoci(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    skopeo, umoci = require_tool("skopeo"), require_tool("umoci")
    cat = _setup(fake_hub, tmp_path)
    result = cli("build", "-c", cat)
    digest = _lock(tmp_path / "catalog.lock")["models"]["tiny"]["image"]["digest"]
    assert digest in result.stdout and "2 layers" in result.stdout
    layout = tmp_path / ".modelcar" / "oci"
    assert f"-> oci:{layout}:tiny@{digest}\n" in result.stderr  # named by model only: no tags in a layout

    inspected = subprocess.run([skopeo, "inspect", f"oci:{layout}:tiny"], capture_output=True, text=True, check=True)
    info = json.loads(inspected.stdout)
    assert info["Digest"] == digest and info["Os"] == "linux" and len(info["Layers"]) == 2

    one = tmp_path / "one-platform"
    subprocess.run(
        [skopeo, "copy", "--preserve-digests", f"oci:{layout}:tiny", f"oci:{one}:tiny"],
        capture_output=True,
        check=True,
    )
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--rootless", "--image", f"{one}:tiny", str(bundle)], capture_output=True, check=True
    )
    root = bundle / "rootfs" / "models"
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert found == SHIPPED
    for path in SHIPPED:
        assert (root / path).read_bytes() == FILES[path], path
        assert stat.S_IMODE((root / path).stat().st_mode) == 0o644
    for d in (root, root / "chat"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_two_empty_caches_two_layouts_same_digest(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = _setup(fake_hub, tmp_path / "a")
    cli("build", "-c", cat)
    first = _lock(tmp_path / "a" / "catalog.lock")["models"]["tiny"]["image"]["digest"]

    other = tmp_path / "b" / "nested"
    other.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "catalog.yaml", other / "catalog.yaml")
    shutil.copy(tmp_path / "a" / "catalog.lock", other / "catalog.lock")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "second-cache"))
    cli("build", "-c", other / "catalog.yaml", "--layout", tmp_path / "elsewhere", "--jobs", "1")
    assert json.loads((tmp_path / "elsewhere" / "index.json").read_text())["manifests"][0]["digest"] == first
    assert (other / "catalog.lock").read_bytes() == (tmp_path / "a" / "catalog.lock").read_bytes()


def test_each_repo_commit_downloaded_once_and_cache_reused(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(
        fake_hub,
        tmp_path,
        CATALOG + "  - name: tiny-again\n    hf: org/tiny\n    servedName: other\n"
        "  - name: tiny-configs\n    hf: org/tiny\n    include: ['*.json']\n",
    )
    result = cli("build", "-c", cat, "--json")
    doc = json.loads(result.stdout)
    assert [m["name"] for m in doc["models"]] == ["tiny", "tiny-again", "tiny-configs"]
    for path in SHIPPED:
        assert fake_hub.count("GET", "/" + path) == 1, path
    assert fake_hub.count("GET", "/pytorch_model.bin") == 0

    before = len(fake_hub.requests)
    cli("build", "-c", cat)
    assert fake_hub.requests[before:] == []  # pinned and cached: the Hub is not asked again


def test_dry_run_writes_nothing(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    result = cli("build", "-c", cat, "--dry-run")
    assert "tiny  hf://org/tiny" in result.stdout
    assert "6 files" in result.stdout
    assert "layer" in result.stdout and "model-00001-of-00002.safetensors" in result.stdout
    assert "dry run: no image and no lock written" in result.stdout
    assert not (tmp_path / "catalog.lock").exists()
    assert not (tmp_path / ".modelcar").exists()
    assert fake_hub.count("GET", ".safetensors") == 0

    doc = json.loads(cli("build", "-c", cat, "--dry-run", "--json").stdout)
    (model,) = doc["models"]
    assert model["digest"] is None and model["files"] == 6
    assert [len(layer["files"]) for layer in model["layers"]] == [5, 1]
    assert model["bytes"] == sum(layer["size"] for layer in model["layers"])


def test_json_summary_on_stdout_logs_on_stderr(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    result = cli("build", "-c", cat, "--json")
    doc = json.loads(result.stdout)  # stdout is one JSON document and nothing else
    (model,) = doc["models"]
    lock = _lock(tmp_path / "catalog.lock")["models"]["tiny"]
    assert model["name"] == "tiny" and model["commit"] == lock["commit"]
    assert model["digest"] == lock["image"]["digest"]
    assert len(model["layers"]) == 2 and all(layer["digest"].startswith("sha256:") for layer in model["layers"])
    assert model["bytes"] == sum(layer["size"] for layer in model["layers"])
    assert "modelcar: tiny: sha256:" in result.stderr


# --- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["revision", "tree", "file"])
def test_429_with_retry_after_is_waited_out(cli: Cli, fake_hub: FakeHub, tmp_path: Path, route: str) -> None:
    cat = _setup(fake_hub, tmp_path)
    fault = fake_hub.inject(route, status=429, headers={"Retry-After": "1"}, times=2)
    result = cli("build", "-c", cat)
    assert fault.times == 0  # both 429s were served, and the build still succeeded
    assert "sha256:" in result.stdout
    # Each waited the second the Hub asked for (not our backoff's own delay), in our retry loop on
    # every route (huggingface_hub does not retry the revision, and retries files its own way).
    waits = re.findall(r"HTTP 429; retry (\d)/8 in ([\d.]+)s", result.stderr)
    assert len(waits) == 2 and {w for _, w in waits} == {"1.0"}, result.stderr
    assert "Logging error" not in result.stderr


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_on_file_download_is_retried(cli: Cli, fake_hub: FakeHub, tmp_path: Path, status: int) -> None:
    cat = _setup(fake_hub, tmp_path)
    fault = fake_hub.inject("file", status=status, path="model-00001-of-00002.safetensors", times=2)
    cli("build", "-c", cat)
    assert fault.times == 0
    cache = tmp_path / "hf-cache"
    assert len(list(cache.rglob("model-00001-of-00002.safetensors"))) == 1


def test_ratelimit_header_is_honoured(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    fake_hub.inject("revision", status=429, headers={"RateLimit": '"api";r=0;t=1'})
    result = cli("lock", "-c", cat)
    assert "HTTP 429; retry 1/8 in 1.0s" in result.stderr


def test_dropped_connection_mid_file(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    fault = fake_hub.inject("file", "drop", path="model-00001-of-00002.safetensors", methods=("GET",), times=2)
    cli("build", "-c", cat)
    assert fault.times == 0
    (blob,) = (tmp_path / "hf-cache").rglob("model-00001-of-00002.safetensors")
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(BIG).digest()


def test_a_file_sent_a_byte_at_a_time_fails_within_the_retry_deadline(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """A Hub (or a CDN, a proxy) that sends a byte every few seconds never trips huggingface_hub's
    read timeout: one 16 MiB file took weeks, whatever --retry-deadline said."""
    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    weights = "model-00001-of-00002.safetensors"
    trickle = fake_hub.inject("file", "trickle", path=weights, methods=("GET",), times=1000)
    result = cli("build", "-c", cat, "--retry-deadline", "2", "--max-retries", "1", code=1)
    assert f"{weights}: " in result.stderr and "the transfer stalled" in result.stderr
    assert 1 <= trickle.acted <= 2  # one attempt and its retry: each cut off, then given up


def test_a_file_sent_past_its_size_is_cut_off_there(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A mirror (HF_ENDPOINT) that sends a file's bytes and then more, without end (chunked, no
    length): huggingface_hub writes all that comes, and checks the size after the last byte, so
    the build filled the disk. It stops at the size the Hub lists, and says so."""
    from tests.fakehub import ENDLESS_MIB

    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    weights = "model-00001-of-00002.safetensors"
    fake_hub.inject("file", "endless", path=weights, methods=("GET",))
    (model,) = json.loads(cli("build", "-c", cat, "--json", code=1).stdout)["models"]
    assert model["error"].endswith(
        f"/{weights}: more than the {len(BIG)} bytes the Hub lists for the file came: not kept"
    )
    cache = tmp_path / "hf-cache"
    assert max(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < len(BIG) + (ENDLESS_MIB << 19)
    # resumed (huggingface_hub asks for the rest after a dropped connection) with the file from its
    # start each time: the bytes added up past the file's size over the requests (20 of them: 320 MiB),
    # not in any one; cut off at the size, the download starts afresh
    fake_hub.inject("file", "drop", path=weights, methods=("GET",))
    rewind = fake_hub.inject("file", "rewind", path=weights, methods=("GET",), times=20)
    result = cli("build", "-c", cat)
    # huggingface_hub 2.x resumes within a download (1.x starts afresh): the first resumed answer is cut
    assert rewind.acted <= 1, rewind.acted
    if rewind.acted:
        cut = f"/{weights}: more than the {len(BIG)} bytes the Hub lists for the file came: not kept; retry"
        assert cut in result.stderr
    rewind.times = 0
    shutil.rmtree(tmp_path / ".modelcar")
    shutil.rmtree(cache / "models--org--tiny")
    # content codings inside each other: each multiplies what a read takes in memory, before any counting
    headers = {"Content-Encoding": "gzip, gzip"}
    fake_hub.inject("file", "status", status=200, headers=headers, path=weights, methods=("GET",))
    (model,) = json.loads(cli("build", "-c", cat, "--json", code=1).stdout)["models"]
    assert model["error"].endswith(
        f"/{weights}: sent with Content-Encoding gzip, gzip: more than one coding, not decoded"
    )
    cli("build", "-c", cat)  # the next run downloads it whole
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_wrong_bytes_once_are_downloaded_again(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    fault = fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",))
    result = cli("build", "-c", cat)
    assert fault.times == 0
    assert "sha256 mismatch, downloading again" in result.stderr
    assert fake_hub.count("GET", "/model-00001-of-00002.safetensors") == 2


def test_a_link_planted_in_the_hf_cache_is_removed_not_what_it_leads_to(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """A bad copy is thrown away before it is downloaded again: where the snapshot's file was a link
    someone put in the cache, to a file outside it, that file was deleted with it."""
    cat = _setup(fake_hub, tmp_path)
    cli("build", "-c", cat)
    (snap,) = (tmp_path / "hf-cache").rglob("snapshots/*/config.json")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    snap.unlink()
    snap.symlink_to(victim)
    result = cli("build", "-c", cat, "--no-cache")
    assert "sha256 mismatch, downloading again" in result.stderr
    assert victim.read_text() == "keep me\n"
    assert snap.read_bytes() == FILES["config.json"]
    # a snapshot directory that leads out of the cache: nothing is removed there; the model fails, saying so
    outside = tmp_path / "outside"
    shutil.copytree(snap.parent, outside, symlinks=False)
    (outside / "config.json").write_text("{}\n")
    shutil.rmtree(snap.parent)
    snap.parent.symlink_to(outside)
    result = cli("build", "-c", cat, "--no-cache", code=1)
    assert "leads out of the Hugging Face cache through a symbolic link" in result.stderr
    assert (outside / "config.json").read_text() == "{}\n"
    assert sorted(p.name for p in outside.iterdir()) == sorted(p.name for p in snap.parent.iterdir())
    # the blobs directory made a link elsewhere, the file linked to a "blob" there: that is no blob to remove
    snap.parent.unlink()
    shutil.copytree(outside, snap.parent, symlinks=False)
    blobs = snap.parents[2] / "blobs"
    shutil.rmtree(blobs)
    blobs.symlink_to(tmp_path, target_is_directory=True)
    (snap.parent / "config.json").unlink()
    (snap.parent / "config.json").symlink_to("../../blobs/victim.txt")
    result = cli("build", "-c", cat, "--no-cache", code=1)
    assert f"{blobs} leads out of the Hugging Face cache through a symbolic link" in result.stderr
    assert victim.read_text() == "keep me\n"


def test_a_cache_reached_through_a_link_is_the_cache(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_CACHE naming a link to another disk: huggingface_hub resolves it, and its paths were
    taken for ones that lead out of the cache, so a bad copy was not thrown away."""
    real = tmp_path / "disk" / "hf"
    real.mkdir(parents=True)
    (tmp_path / "hf-link").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-link"))
    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",), times=2)
    result = cli("build", "-c", cat, code=1)
    assert "model-00001-of-00002.safetensors: sha256 mismatch after two downloads" in result.stderr
    assert "leads out" not in result.stderr
    assert not [p for p in real.rglob("*") if p.is_file() and p.stat().st_size == len(BIG)]  # thrown away
    cli("build", "-c", cat)
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_a_good_copy_another_run_put_in_place_of_a_bad_one_is_kept(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs sharing an HF cache that find the same file bad each download it again: one threw
    away the good copy the other had just downloaded, which then failed on a file gone. A copy
    that is not the one found bad is checked and kept; one gone as it is read is fetched again."""
    from modelcar.hub import Hub

    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",))
    real = Hub.refetch

    def after_another_run(self: Hub, repo: str, commit: str, file: Any, seen: Any = None) -> Path:
        (link,) = (tmp_path / "hf-cache").rglob("snapshots/*/model-00001-of-00002.safetensors")
        good = link.resolve().with_suffix(".other-run")
        good.write_bytes(BIG)
        os.replace(good, link.resolve())  # what another run's download does: a new file, renamed in
        return real(self, repo, commit, file, seen)

    monkeypatch.setattr(Hub, "refetch", after_another_run)
    cli("build", "-c", cat)
    assert fake_hub.count("GET", "/model-00001-of-00002.safetensors") == 1  # the bad one only

    # a copy thrown away as it is downloaded (by a run that found the one before it bad): once more
    (tmp_path / ".modelcar").rename(tmp_path / "first")
    shutil.rmtree(tmp_path / "hf-cache")
    shutil.rmtree(tmp_path / "modelcar-cache", ignore_errors=True)
    monkeypatch.setattr(Hub, "refetch", real)
    fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",))
    download, calls = Hub.download, []

    def thrown_away_once(self: Hub, repo: str, commit: str, path: str, size: int | None = None) -> Path:
        local: Path = download(self, repo, commit, path, size)
        calls.append(path)
        if path == "model-00001-of-00002.safetensors" and len([c for c in calls if c == path]) == 2:
            local.resolve().unlink()
        return local

    monkeypatch.setattr(Hub, "download", thrown_away_once)
    cli("build", "-c", cat)
    assert fake_hub.count("GET", "/model-00001-of-00002.safetensors") == 1 + 3


def test_a_weight_two_repos_share_is_downloaded_once(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A model and its copy under another org (the same shard in two repos) downloaded the weight
    once each; once now, and from the other repo after all where the first cannot give it."""
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.add_repo("mirror/tiny", FILES)
    two = CATALOG + "  - name: copy\n    hf: mirror/tiny\n"
    cat = write_catalog(tmp_path / "catalog.yaml", two)
    cli("lock", "-c", cat)
    fake_hub.requests.clear()
    built = json.loads(cli("build", "-c", cat, "--json").stdout)["models"]
    assert fake_hub.count("GET", "/model-00001-of-00002.safetensors") == 1
    assert [m["error"] for m in built] == [None, None]
    assert built[0]["layers"][-1]["digest"] == built[1]["layers"][-1]["digest"]  # the weight's layer

    # the first repo refuses it (a token that may not read it): the second gives it all the same
    shutil.rmtree(tmp_path / "hf-cache")
    shutil.rmtree(tmp_path / ".modelcar")
    shutil.rmtree(tmp_path / "modelcar-cache", ignore_errors=True)
    fake_hub.inject("file", status=403, path="model-00001-of-00002.safetensors", times=1)
    built = json.loads(cli("build", "-c", cat, "--json", code=2).stdout)["models"]  # the token: 2, not a retry
    assert built[0]["error"] and built[1]["error"] is None, built


def test_wrong_bytes_in_a_cache_this_user_may_not_write_say_so(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared HF cache, read-only here, holding a damaged file: the error was the unlink's
    `Permission denied`, which hid the damage and said nothing to do."""
    import errno

    from modelcar.hub import Hub

    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",))

    def read_only(_: Hub, repo: str, snapshot_file: Path) -> None:  # what root cannot be made to see by chmod
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(snapshot_file))

    monkeypatch.setattr(Hub, "_evict", read_only)
    result = cli("build", "-c", cat, code=1)
    assert "model-00001-of-00002.safetensors: the HF cache's copy does not match the lock (sha256 " in result.stderr
    assert ": Permission denied): repair that cache (`hf cache verify`), or set HF_HUB_CACHE" in result.stderr


def test_wrong_bytes_twice_fail_and_write_no_image(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",), times=2)
    result = cli("build", "-c", cat, code=1)
    expected = hashlib.sha256(BIG).hexdigest()
    actual = hashlib.sha256(bytes(b ^ 0xFF for b in BIG)).hexdigest()
    assert (
        f"model-00001-of-00002.safetensors: sha256 mismatch after two downloads: expected {expected}, got {actual}"
        in result.stderr
    )
    layout = tmp_path / ".modelcar" / "oci"
    index = layout / "index.json"
    assert not index.exists() or json.loads(index.read_text())["manifests"] == []  # no image named
    bad = bytes(b ^ 0xFF for b in BIG[:65536])
    assert not any(bad in blob.read_bytes() for blob in layout.rglob("blobs/sha256/*"))  # no bad byte stored
    assert "image" not in _lock(tmp_path / "catalog.lock")["models"]["tiny"]
    assert not list((tmp_path / "hf-cache").rglob("model-00001-of-00002.safetensors"))  # evicted


def test_retry_after_past_the_deadline_fails_at_once(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    fake_hub.inject("revision", status=429, headers={"Retry-After": "3600"}, times=100)
    result = cli("lock", "-c", cat, "--retry-deadline", "60", code=1)
    assert "the server asks to wait 3600s, past the 60s retry deadline (--retry-deadline)" in result.stderr
    assert f"{cat}: models[0] (tiny): org/tiny@main" in result.stderr


@pytest.mark.parametrize(("status", "method"), [(429, "GET"), (503, "GET"), (503, "HEAD")])
def test_max_retries_caps_file_downloads_too(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, status: int, method: str
) -> None:
    """huggingface_hub retries a file GET's 429 by itself (5 times, Retry-After + 1 s each), and a
    HEAD's 5xx (sleeping 1, 2, 4, 8, 8 s); modelcar takes those over, so --max-retries and
    --retry-deadline bound what a rate-limited or failing file costs."""
    cat = _setup(fake_hub, tmp_path)
    cli("lock", "-c", cat)
    path = "model-00001-of-00002.safetensors"
    fake_hub.inject("file", status=status, headers={"Retry-After": "0"}, path=path, methods=(method,), times=100)
    result = cli("build", "-c", cat, "--max-retries", "1", code=1)
    assert fake_hub.count(method, f"/{path}") == 2  # the first and one retry, not 2 x 6
    assert f"{path}: still failing after 2 attempts (HTTP {status})" in result.stderr


def test_max_retries_caps_attempts(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    fault = fake_hub.inject("revision", status=503, headers={"Retry-After": "0"}, times=100)
    result = cli("lock", "-c", cat, "--max-retries", "2", code=1)
    assert "org/tiny@main: still failing after 3 attempts (HTTP 503); raise --max-retries" in result.stderr
    assert fault.times == 97  # exactly three attempts: the first and two retries


def _locked_path_model(cli: Cli, tmp_path: Path, config: str) -> tuple[Path, Path]:
    """A local model `m` holding only config.json, locked: (its config.json, the catalog)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(config)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    return model / "config.json", cat


def test_a_file_added_to_a_local_model_is_named_until_it_is_locked(cli: Cli, tmp_path: Path) -> None:
    """The lock says what a build ships: a file put beside a locked model is not in its image
    (`lock --update` takes it in), and the build says so instead of shipping without a word."""
    config, cat = _locked_path_model(cli, tmp_path, "{}")
    first = cli("build", "-c", cat, "--json")
    (config.parent / "tokenizer.json").write_text("{}")
    result = cli("build", "-c", cat, "--json")
    assert json.loads(result.stdout)["models"][0]["digest"] == json.loads(first.stdout)["models"][0]["digest"]
    assert (
        f"{cat}: models[0] (m): 1 file the lock does not list, not in the image (tokenizer.json): "
        f"`modelcar lock --update m -c {cat}` takes it in"
    ) in result.stderr
    cli("lock", "-c", cat, "--update", "m")
    result = cli("build", "-c", cat, "--json")
    assert json.loads(result.stdout)["models"][0]["files"] == 2 and "lock does not list" not in result.stderr


def test_the_default_layout_stays_out_of_git(cli: Cli, tmp_path: Path) -> None:
    """The catalog usually sits in a GitOps checkout: `git add -A` there must not commit the
    layout's whole weights."""
    git = shutil.which("git")
    assert git is not None
    subprocess.run([git, "init", "-q", str(tmp_path)], check=True)
    _, cat = _locked_path_model(cli, tmp_path, "{}")
    cli("build", "-c", cat)
    assert (tmp_path / ".modelcar" / "oci" / "index.json").is_file()
    status = subprocess.run(
        [git, "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "catalog.lock" in status and ".modelcar" not in status


def test_lock_forgets_an_image_built_on_another_base_and_keeps_it_for_a_new_tag(cli: Cli, tmp_path: Path) -> None:
    _, cat = _locked_path_model(cli, tmp_path, "{}")
    lock = tmp_path / "catalog.lock"
    cli("build", "-c", cat)
    digest = _lock(lock)["models"]["m"]["image"]["digest"]
    write_catalog(cat, "models:\n  - name: m\n    path: ./m\n    tags: [stable]\n")
    cli("lock", "-c", cat)
    assert _lock(lock)["models"]["m"]["image"]["digest"] == digest  # same image; the tag is the next push's
    base = "registry.example/shell@sha256:" + "e" * 64
    write_catalog(cat, f"models:\n  - name: m\n    path: ./m\n    tags: [stable]\n    base: {base}\n")
    cli("lock", "-c", cat)
    assert "image" not in _lock(lock)["models"]["m"]  # not the image this entry now makes: patch, plan see it
    assert _lock(lock)["models"]["m"]["earlier"] == {"digest": digest}  # its files' layers are reused from it

    # a lock from before bases were recorded: its image is taken at its word, not dropped
    doc = _lock(lock)
    doc["models"]["m"]["image"] = {"digest": digest, "repository": "registry.example/models/m"}
    lock.write_text(yaml.safe_dump(doc))
    cli("lock", "-c", cat)
    assert _lock(lock)["models"]["m"]["image"] == {"digest": digest, "repository": "registry.example/models/m"}


def test_a_file_system_error_fails_that_model_only_in_one_line(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelcar.stores.layout import LayoutStore

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"name": "{name}"}}')
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    path: ./a\n  - name: b\n    path: ./b\n")
    put_blob = LayoutStore.put_blob

    def disk_full_for_b(self: LayoutStore, repo: str, *args: Any, **kwargs: Any) -> str:
        if repo == "b":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / "blobs"))
        return put_blob(self, repo, *args, **kwargs)

    monkeypatch.setattr(LayoutStore, "put_blob", disk_full_for_b)
    result = cli("build", "-c", cat, code=1)
    assert f"b: {tmp_path / '.modelcar' / 'oci' / 'blobs'}: No space left on device" in result.stderr
    lock = _lock(tmp_path / "catalog.lock")["models"]
    assert "image" in lock["a"] and "image" not in lock["b"]  # a was built and recorded all the same

    afile = tmp_path / "afile"
    afile.write_text("")
    result = cli("build", "a", "-c", cat, "--layout", afile / "oci", code=1)
    assert f"error: a: {afile / 'oci' / 'blobs' / 'sha256'}: Not a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_path_model_changed_since_lock_fails(cli: Cli, tmp_path: Path) -> None:
    config, cat = _locked_path_model(cli, tmp_path, "{}")
    config.write_text('{"changed": true}')
    result = cli("build", "-c", cat, code=2)  # the files or the lock to change: not worth a retry
    assert "does not match the lock" in result.stderr and "modelcar lock --update m" in result.stderr
    # `lock`, what a user runs first, keeps the pin: it says the files changed, not only "unchanged"
    result = cli("lock", "-c", cat)
    assert "(m): files changed since the lock" in result.stderr and "`modelcar lock --update m" in result.stderr
    cli("lock", "-c", cat, "--update")
    assert "files changed" not in cli("lock", "-c", cat).stderr


def test_local_file_names_are_utf_8_whatever_the_locale(cli: Cli, tmp_path: Path) -> None:
    """A runner whose locale is not UTF-8 (here: C, without Python's coercion to UTF-8) builds the
    same image from the same lock: the names in it, and so its digest, are the UTF-8 ones."""
    model = tmp_path / "m"
    (model / "sub dir").mkdir(parents=True)
    (model / "näme-ü.json").write_text("{}")
    (model / "sub dir" / "日本.json").write_text("[]")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    digest = json.loads(cli("build", "-c", cat, "--json").stdout)["models"][0]["digest"]
    env = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = run_module("build", "-c", cat, "--layout", tmp_path / "other", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["digest"] == digest
    assert sorted(f["path"] for f in _lock(tmp_path / "catalog.lock")["models"]["m"]["files"]) == [
        "näme-ü.json",
        "sub dir/日本.json",
    ]


def test_a_file_name_that_is_not_utf_8_is_named_in_one_line(cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with open(os.fsencode(model) + b"/caf\xe9.json", "wb") as f:
        f.write(b"{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    result = cli("lock", "-c", cat, code=2)
    assert result.stderr == (
        f"error: {cat}: models[0] (m): {model}/caf\\xe9.json: the file name is not UTF-8: rename it, "
        "or leave it out with `exclude`\n"
    )
    write_catalog(cat, "models:\n  - name: m\n    path: ./m\n    exclude: ['caf*']\n")
    cli("lock", "-c", cat)


def test_a_local_model_is_listed_through_its_links_as_a_reader_sees_it(cli: Cli, tmp_path: Path) -> None:
    """vLLM reading the directory follows links to directories as to files: the image must hold
    what it would read (a linked directory was left out, with exit 0)."""
    shared = tmp_path / "shared-tok"
    (shared / "sub").mkdir(parents=True)
    (shared / "tokenizer.json").write_text('{"t": 1}')
    (shared / "sub" / "vocab.txt").write_text("a\n")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer").symlink_to(shared)  # a directory outside the tree
    (model / "tok2").symlink_to("tokenizer")  # a second way to the same directory
    (model / "weights.json").symlink_to(shared / "tokenizer.json")  # a file outside
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat)
    files = {f["path"]: f["size"] for f in _lock(tmp_path / "catalog.lock")["models"]["m"]["files"]}
    assert files == {
        "config.json": 2,
        "tok2/sub/vocab.txt": 2,
        "tok2/tokenizer.json": 8,
        "tokenizer/sub/vocab.txt": 2,
        "tokenizer/tokenizer.json": 8,
        "weights.json": 8,
    }
    cli("verify", "-c", cat)


def test_a_broken_link_or_a_loop_in_a_local_model_is_an_error_not_a_missing_file(cli: Cli, tmp_path: Path) -> None:
    """An HF snapshot directory whose download did not finish has links to blobs that are not
    there: the build left those files out and said nothing."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model-00002.safetensors").symlink_to("../blobs/3f2a")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    result = cli("build", "-c", cat, code=2)
    assert result.stderr == (
        f"error: {cat}: models[0] (m): {model}/model-00002.safetensors: a link to ../blobs/3f2a, which does not "
        "exist (a download that did not finish?): mend it, or leave it out with `exclude`\n"
    )
    assert not (tmp_path / "catalog.lock").exists()
    write_catalog(cat, "models:\n  - name: m\n    path: ./m\n    exclude: ['*.safetensors']\n")
    cli("build", "-c", cat)  # left out, as asked

    (model / "sub").mkdir()
    (model / "sub" / "up").symlink_to("..")
    result = cli("lock", "-c", cat, "--update", code=2)
    assert f"{model}/sub/up: a link back to {model}, which holds it (a loop)" in result.stderr
    (model / "sub" / "up").unlink()

    # a link to itself: refused by name where the selection takes it, passed over where it does not
    (model / "self.json").symlink_to("self.json")
    result = cli("lock", "-c", cat, "--update", code=2)
    assert result.stderr == (
        f"error: {cat}: models[0] (m): {model}/self.json: cannot be read (Too many levels of symbolic links): "
        "mend it, or leave it out with `exclude`\n"
    )
    write_catalog(cat, "models:\n  - name: m\n    path: ./m\n    exclude: ['*.safetensors', 'self*']\n")
    cli("lock", "-c", cat, "--update")

    # a name that is no UTF-8 is shown as its bytes, as everywhere else
    os.symlink("gone", os.fsencode(model) + b"/caf\xe9.json")
    result = cli("lock", "-c", cat, "--update", code=2)
    assert f"{model}/caf\\xe9.json: a link to gone, which does not exist" in result.stderr
    os.unlink(os.fsencode(model) + b"/caf\xe9.json")

    # a file that cannot be read (root reads anything: run without that power)
    setpriv = require_tool("setpriv")
    (model / "secret.json").write_text("{}")
    (model / "secret.json").chmod(0)
    without_dac = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    done = subprocess.run(
        [*without_dac, sys.executable, "-m", "modelcar", "lock", "-c", str(cat), "--update"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (
        2,
        f"error: {cat}: models[0] (m): {model}/secret.json: cannot be read (Permission denied): mend it, or "
        "leave it out with `exclude`\n",
    )


def test_no_home_directory_is_said_and_a_local_build_goes_on(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random UID with neither HOME nor a passwd entry (OpenShift): `~` does not expand. A local
    model builds (its layer digests not remembered, nothing made under ./~), a Hub model is told
    to set HF_HOME, in one line each."""
    for name in ("HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "MODELCAR_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it gives without a home
    monkeypatch.chdir(tmp_path)
    config, cat = _locked_path_model(cli, tmp_path, '{"a": 1}')
    result = cli("build", "-c", cat)
    assert "layer digests not remembered: no home directory for the Hugging Face cache" in result.stderr
    assert not (tmp_path / "~").exists()
    assert "(0 written, 1 already there)" in cli("build", "-c", cat).stderr  # the layout's image says so
    config.write_text('{"a": 2}')  # rewritten in place: with no notes kept, the files are read again
    assert "config.json: its content does not match the lock" in cli("build", "-c", cat, code=2).stderr
    fake_hub.add_repo("org/tiny", FILES)
    hub_cat = write_catalog(tmp_path / "hub" / "catalog.yaml", CATALOG)
    result = cli("build", "-c", hub_cat, code=2)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no home directory for the Hugging Face cache (~/.cache/huggingface/hub): set HF_HOME or HF_HUB_CACHE"
    )


def test_concurrent_builds_of_different_models_share_layout_and_lock(tmp_path: Path) -> None:
    """Two processes building into one layout and one lock: neither's start-up sweep takes the
    other's temp files, neither fails on the other's locks, both images and entries land. (That
    two writers' read-modify-write cannot lose an entry is forced, not left to timing, in
    test_lock's two writers of one lock and test_layout's many writers of one index.)"""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"name": "{name}"}}')
        (tmp_path / name / "model.safetensors").write_bytes(name.encode() * (20 << 20))
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    path: ./a\n  - name: b\n    path: ./b\n")
    procs = [
        subprocess.Popen(
            [os.sys.executable, "-m", "modelcar", "build", name, "-c", str(cat)],  # type: ignore[attr-defined]
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lock = _lock(tmp_path / "catalog.lock")["models"]
    index = json.loads((tmp_path / ".modelcar" / "oci" / "index.json").read_text())
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert refs == {"a": lock["a"]["image"]["digest"], "b": lock["b"]["image"]["digest"]}


# --- entry points -------------------------------------------------------------------------------


def test_python_m_modelcar_builds_the_example(tmp_path: Path) -> None:
    work = _example(tmp_path).parent
    before = (work / "catalog.lock").read_bytes()
    proc = run_module("build", "-c", work / "catalog.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["models"][0]["name"] == "tiny-chat"
    assert (work / "catalog.lock").read_bytes() == before  # the committed lock is what a build gives
    assert doc["models"][0]["digest"] == _lock(work / "catalog.lock")["models"]["tiny-chat"]["image"]["digest"]


def test_console_script_exit_codes(tmp_path: Path) -> None:
    script = shutil.which("modelcar", path=os.path.dirname(os.sys.executable))  # type: ignore[attr-defined]
    assert script, "the modelcar console script is installed beside the interpreter"
    bad = write_catalog(tmp_path / "catalog.yaml", "models: [")
    proc = subprocess.run([script, "build", "-c", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "YAML syntax error" in proc.stderr and proc.stdout == ""
    proc = subprocess.run([script, "build", "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2


def _example(tmp_path: Path) -> Path:
    work = tmp_path / "examples"
    shutil.copytree(Path(__file__).parent.parent / "examples", work, ignore=shutil.ignore_patterns(".modelcar"))
    return work / "catalog.yaml"


def test_progress_bars_on_a_terminal_only(cli: Cli, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    cat = _example(tmp_path)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal's size
    proc = subprocess.Popen(
        [os.sys.executable, "-m", "modelcar", "build", "-c", str(cat)],  # type: ignore[attr-defined]
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=secondary,
    )
    os.close(secondary)
    out, _ = proc.communicate(timeout=120)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "build: 100%|" in terminal  # tqdm drew its bar on the terminal
    assert "%|" not in out.decode()  # and never on stdout

    result = cli("build", "-c", cat)  # not a terminal: clean logs only
    assert "%|" not in result.stderr and "modelcar: tiny-chat: sha256:" in result.stderr


def test_new_commit_downloads_only_changed_files(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine (empty HF cache, empty layer cache) building a commit that changes only
    config.json: the weights' layers come from the previous image in the store, by annotation."""
    cat = _setup(fake_hub, tmp_path)
    cli("build", "-c", cat)
    first = _lock(tmp_path / "catalog.lock")["models"]["tiny"]["image"]["digest"]
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen3"}\n'})
    cli("lock", "-c", cat, "--update")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh-hf-cache"))
    monkeypatch.setenv("MODELCAR_CACHE", str(tmp_path / "fresh-layer-cache"))
    fake_hub.requests.clear()
    result = cli("build", "-c", cat, "--json")
    (model,) = json.loads(result.stdout)["models"]
    assert model["digest"] != first
    downloaded = sorted(
        {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p}
    )
    # the small-files layer changed, so its files are fetched; the 16 MiB weight's layer is reused
    assert downloaded == sorted(p for p in SHIPPED if p != "model-00001-of-00002.safetensors")
    assert not list((tmp_path / "fresh-hf-cache").rglob("model-00001-of-00002.safetensors"))
    big = next(layer for layer in model["layers"] if layer["files"] == ["model-00001-of-00002.safetensors"])
    old_index = json.loads((tmp_path / ".modelcar" / "oci" / "blobs" / "sha256" / first[7:]).read_bytes())
    old_manifest = json.loads(
        (tmp_path / ".modelcar" / "oci" / "blobs" / "sha256" / old_index["manifests"][0]["digest"][7:]).read_bytes()
    )
    assert big["digest"] in [layer["digest"] for layer in old_manifest["layers"]]
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_build_update_builds_the_new_commit_in_one_run(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """`build --update` is `lock --update` and the build in one process: a new commit on the tracked
    branch is pinned and built at once; a plain `build` keeps the pin."""
    cat = _setup(fake_hub, tmp_path)
    cli("build", "-c", cat)
    old = _lock(tmp_path / "catalog.lock")["models"]["tiny"]
    new_commit = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen3"}\n'})
    assert new_commit != old["commit"]

    cli("build", "-c", cat)  # no --update: the pinned commit stays, its image is already there
    assert _lock(tmp_path / "catalog.lock")["models"]["tiny"] == old

    fake_hub.requests.clear()
    result = cli("build", "-c", cat, "--update", "--json")
    (model,) = json.loads(result.stdout)["models"]
    entry = _lock(tmp_path / "catalog.lock")["models"]["tiny"]
    assert model["commit"] == entry["commit"] == new_commit
    assert entry["image"]["digest"] == model["digest"] != old["image"]["digest"]
    assert model["layersReused"] == len(model["layers"]) - 1  # only the small files' layer is new
    weights = [p for m, p in fake_hub.requests if m == "GET" and p.endswith(".safetensors")]
    assert weights == []
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_a_known_layer_digest_checks_the_files_in_the_same_pass(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer cache knows each layer (an earlier build into another store), so a build into a new
    store streams each layer once without the per-file sha256: the store checks the stream against
    the known digest, and that digest was made from bytes checked against the lock."""
    cat = _setup(fake_hub, tmp_path)
    first = json.loads(cli("build", "-c", cat, "--layout", tmp_path / "a", "--json").stdout)["models"][0]["digest"]
    checked_files: list[str] = []
    real = build_module.read_checked

    def spy(path: Path, member: Member, **kwargs: Any) -> Iterator[Chunk]:
        checked_files.append(member.path)
        return real(path, member, **kwargs)  # read_checked's own keywords (notes), whatever they are

    monkeypatch.setattr(build_module, "read_checked", spy)
    result = cli("build", "-c", cat, "--layout", tmp_path / "b", "--json")
    (model,) = json.loads(result.stdout)["models"]
    assert model["digest"] == first
    assert checked_files == []  # one pass per layer, no second sha256 of the files
    assert cli("verify", "-c", cat, "--layout", tmp_path / "b").stdout == "tiny  ok\n"


def test_files_checked_once_are_not_hashed_again_until_they_change(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_xattrs: None
) -> None:
    """Without the layer digests (a new layer cache), a build from the HF cache makes each layer's
    digest but checks only the files not stamped as checked: the first build's downloads were."""
    cat = _setup(fake_hub, tmp_path)
    first = json.loads(cli("build", "-c", cat, "--layout", tmp_path / "a", "--json").stdout)["models"][0]["digest"]
    locked = {f["path"]: f["sha256"] for f in _lock(tmp_path / "catalog.lock")["models"]["tiny"]["files"]}
    snapshot = next((tmp_path / "hf-cache").glob("models--org--tiny/snapshots/*"))
    for path, sha256 in locked.items():
        assert os.getxattr(snapshot / path, checked.STAMP).split()[0] == sha256.encode()

    hashed: list[int] = []

    class Counting:
        @staticmethod
        def sha256() -> hashlib._Hash:
            hashed.append(1)
            return hashlib.sha256()

    monkeypatch.setattr(checked, "hashlib", Counting)
    shutil.rmtree(tmp_path / "modelcar-cache")
    result = cli("build", "-c", cat, "--layout", tmp_path / "b", "--json")
    assert json.loads(result.stdout)["models"][0]["digest"] == first
    assert hashed == []

    weight = snapshot / "model-00001-of-00002.safetensors"
    os.utime(weight, ns=(weight.stat().st_atime_ns, weight.stat().st_mtime_ns + 1))  # written to since
    shutil.rmtree(tmp_path / "modelcar-cache")
    result = cli("build", "-c", cat, "--layout", tmp_path / "c", "--json")
    assert json.loads(result.stdout)["models"][0]["digest"] == first
    assert hashed == [1]  # that file alone, stamped again
    assert checked.is_stamped(weight, locked[weight.name])


def test_verify_of_an_image_never_built_says_to_build_it_not_to_distrust_caches(cli: Cli, tmp_path: Path) -> None:
    _, cat = _locked_path_model(cli, tmp_path, "{}")
    result = cli("verify", "-c", cat, code=1)
    assert f"no image digest in the lock: run `modelcar build m -c {cat}`" in result.stdout
    assert "--no-cache" not in result.stderr
    (model,) = json.loads(cli("verify", "-c", cat, "--json", code=1).stdout)["models"]
    assert model["store"] is None and model["problems"] == [result.stdout.splitlines()[1].strip()]  # null, not ""


def test_no_cache_rebuilds_an_image_that_verify_found_damaged(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, user_xattrs: None
) -> None:
    """Bits that rot under an unchanged mtime: the stamp is trusted, the layer made from them is
    stored under their digest, and every later build reuses it. `--no-cache` trusts nothing
    remembered: the file is checked (and fetched again), the layer made anew, the cache mended."""
    cat = _setup(fake_hub, tmp_path)
    cli("build", "-c", cat, "--layout", tmp_path / "a")
    snapshot = next((tmp_path / "hf-cache").glob("models--org--tiny/snapshots/*"))
    weight = (snapshot / "model-00001-of-00002.safetensors").resolve()
    st = weight.stat()
    with weight.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xff")
    os.utime(weight, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(tmp_path / "modelcar-cache")
    cli("build", "-c", cat)  # the stamp is trusted: a damaged image
    result = cli("verify", "-c", cat, code=1)
    assert result.stdout.startswith(f"tiny  FAILED  oci:{tmp_path / '.modelcar' / 'oci'}\n")
    assert "model-00001-of-00002.safetensors: sha256 " in result.stdout and "the lock has" in result.stdout
    assert f"`modelcar build --no-cache tiny -c {cat}`" in result.stderr
    assert "(0 written, 2 already there)" in cli("build", "-c", cat).stderr  # and it stays so
    assert "the lock has" in cli("verify", "-c", cat, code=1).stdout

    result = cli("build", "-c", cat, "--no-cache")
    assert "2 written, 0 already there" in result.stderr
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"
    assert weight.read_bytes() == BIG or (snapshot / weight.name).read_bytes() == BIG  # fetched again
    assert "(0 written, 2 already there)" in cli("build", "-c", cat).stderr  # the mended cache is used


def test_no_cache_still_reads_a_local_file_whose_layer_another_model_made(cli: Cli, tmp_path: Path) -> None:
    """Two local models locked with the same config.json: the second one's rewritten in place is
    not passed over because the first one's layer (same lock entry) was made in the same run."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"a": 1}')
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    path: ./a\n  - name: b\n    path: ./b\n")
    cli("lock", "-c", cat)
    (tmp_path / "b" / "config.json").write_text('{"a": 2}')
    for args in ((), ("--no-cache",)):
        result = cli("build", "-c", cat, *args, code=2)
        assert f"b: {cat}: models[1] (b): {tmp_path / 'b' / 'config.json'}: its content does not match" in result.stderr


def test_a_local_model_is_checked_on_every_build_and_not_stamped(cli: Cli, tmp_path: Path, user_xattrs: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(b"{}")
    (src / "model.safetensors").write_bytes(b"\x01" * 5000)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: local\n    path: src\n")
    cli("build", "-c", cat, "--layout", tmp_path / "a")
    assert [p for p in src.iterdir() if STAMP in os.listxattr(p)] == []
    weight = src / "model.safetensors"
    st = weight.stat()
    weight.write_bytes(b"\x02" * 5000)
    os.utime(weight, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(tmp_path / "modelcar-cache")
    result = cli("build", "-c", cat, "--layout", tmp_path / "b", code=2)
    assert "model.safetensors" in result.stderr and "does not match the lock" in result.stderr


def test_a_layer_cache_that_cannot_be_written_is_only_warned_about(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache only saves reads (a read-only HF cache shared by CI runners has it beside it)."""
    cat = _setup(fake_hub, tmp_path)
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("MODELCAR_CACHE", str(tmp_path / "not-a-dir" / "cache"))
    result = cli("build", "-c", cat, "--layout", tmp_path / "a")
    warnings = [line for line in result.stderr.splitlines() if "layer digests not remembered" in line]
    assert len(warnings) == 1 and "set MODELCAR_CACHE to a writable directory" in warnings[0], result.stderr
    assert _lock(tmp_path / "catalog.lock")["models"]["tiny"]["image"]["digest"].startswith("sha256:")
    # what the store's earlier image holds is still known, for this run: nothing is written again
    assert "(0 written, 2 already there)" in cli("build", "-c", cat, "--layout", tmp_path / "a").stderr


def _run_with_file_size_limit(limit: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`modelcar ARGS` where no file may grow past `limit` bytes: a full disk's EFBIG, on demand."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.argv = ['modelcar', *{[str(a) for a in args]!r}]\n"
        "from modelcar.cli import main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_write_that_fails_names_the_place_it_was_writing_to(cli: Cli, tmp_path: Path) -> None:
    """A full disk (here: a file-size limit, EFBIG) raises from write() with no file name; the
    one-line error still says where. Nothing half-written is left in the layout."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(3 << 20))
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    layout = tmp_path / "lay"

    def limited(*args: str | Path) -> list[str]:
        proc = _run_with_file_size_limit(1 << 20, *args)
        assert proc.returncode == 1, proc.stderr
        return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]

    assert limited("build", "-c", cat, "--layout", layout) == [
        f"error: m: {layout / 'blobs' / 'sha256'}: File too large"
    ]
    assert [p.name for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > 1 << 20] == []
    cli("build", "-c", cat, "--layout", layout)
    archive = tmp_path / "out" / "m.tar"
    assert limited("mirror", "-c", cat, "--layout", layout, "--to", f"oci-archive:{archive}") == [
        f"error: m: {archive}: File too large"
    ]
    assert not archive.exists()


def test_a_library_s_warning_is_one_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    """huggingface_hub 2.x warns as it loads about HF_HUB_ENABLE_HF_TRANSFER, which CI setups still
    set: Python printed it as two lines with a source path, in the middle of the run's log."""
    from modelcar import cli

    loggers = [logging.getLogger(name) for name in ("modelcar", "huggingface_hub")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    try:
        with warnings.catch_warnings():  # the process's showwarning and filters come back after
            warnings.simplefilter("always")
            cli._setup_logging(verbose=False)
            warnings.warn("The `HF_X` environment variable is deprecated", FutureWarning, stacklevel=1)
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
    assert capsys.readouterr().err == "modelcar: FutureWarning: The `HF_X` environment variable is deprecated\n"


def test_a_full_hf_cache_is_named_as_the_hf_cache(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub's write fails with no file name: the error said only "No space left on
    device", and a user looked at the layout's disk."""
    fake_hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": os.urandom(2 << 20)})
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: big\n    hf: org/big\n")
    cli("lock", "-c", cat)
    proc = _run_with_file_size_limit(1 << 20, "build", "-c", cat, "--layout", tmp_path / "lay", "--max-retries", "0")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: big: org/big@") and errors[0].endswith(
        f": model.safetensors: {tmp_path / 'hf-cache'}: File too large"
    ), errors


def test_a_lock_that_cannot_be_written_says_the_images_were(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    """The push went through, the lock could not be written (here: a file-size limit the lock is
    over): the error says so, and the next build records them without writing anything again."""
    model = tmp_path / "m"
    model.mkdir()
    for i in range(8):
        (model / f"shard-{i}.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    args = ["build", "-c", str(cat), "--push", "--registry", f"{registry.host}/mc"]
    with_json = _run_with_file_size_limit(512, *args, "--json")
    assert with_json.returncode == 1, with_json.stderr
    as_json = json.loads(with_json.stdout)
    assert as_json["models"][0]["error"] is None and "does not record them" in as_json["error"]
    proc = _run_with_file_size_limit(512, *args)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("m  sha256:")  # the image, reported
    lock = tmp_path / "catalog.lock"
    assert f"error: {lock}: File too large: the images were written, {lock} does not record them" in proc.stderr
    assert "1 already there" in cli(*args).stderr
    assert _lock(tmp_path / "catalog.lock")["models"]["m"]["image"]["digest"] == proc.stdout.split()[1]


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_a_source_that_fails_to_read_is_not_blamed_on_the_store(tmp_path: Path, kind: str) -> None:
    from modelcar.stores.archive import ArchiveStore
    from modelcar.stores.layout import LayoutStore

    def source() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError(errno.EIO, "Input/output error")

    store = LayoutStore(tmp_path / "lay") if kind == "oci" else ArchiveStore(tmp_path / "a.tar", write=True)
    with pytest.raises(OSError) as info, store:
        store.put_blob("m", 2000, source, "sha256:" + "0" * 64)
    assert info.value.filename is None  # the source's error, as the source raised it
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size >= 1000] == []


def test_bytes_written_counts_only_what_reached_the_store(cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")

    def written(*args: str, code: int = 0) -> int:
        doc = json.loads(cli("build", "-c", cat, "--json", *args, code=code).stdout)
        return int(doc["models"][0]["bytesWritten"])

    assert written("--dry-run") == 0
    failed = ("--push", "--registry", "127.0.0.1:1/x", "--max-retries", "0")  # nothing listens there
    assert written(*failed, code=1) == 0
    first = written()
    assert first > 0 and written() == 0  # the layout holds it all the second time


def test_a_wrong_cached_digest_or_bad_file_falls_back_to_checking_the_files(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    cat = _setup(fake_hub, tmp_path)
    first = json.loads(cli("build", "-c", cat, "--layout", tmp_path / "a", "--json").stdout)["models"][0]["digest"]
    cache = tmp_path / "modelcar-cache" / "layers"
    good = {p: p.read_text() for p in cache.iterdir()}
    for p, text in good.items():  # the cache names other layers, of the right sizes
        p.write_text(f"sha256:{'0' * 64} {text.split()[1]}\n")
    result = cli("build", "-c", cat, "--layout", tmp_path / "b", "--json")
    assert json.loads(result.stdout)["models"][0]["digest"] == first
    assert "not the cached layer sha256:0000" in result.stderr
    assert {p: p.read_text() for p in cache.iterdir()} == good  # and the cache is right again

    # The cache is right, but a weight in the HF cache went bad on disk (same size, same mtime: its
    # stamp still says checked): that stream fails the cached digest, the files are checked, stamps
    # or not, and the bad one is downloaded again.
    (weight,) = (tmp_path / "hf-cache").rglob("model-00001-of-00002.safetensors")
    blob = weight.resolve()
    st = blob.stat()
    blob.write_bytes(b"\0" * st.st_size)
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    fake_hub.requests.clear()
    result = cli("build", "-c", cat, "--layout", tmp_path / "c", "--json")
    assert json.loads(result.stdout)["models"][0]["digest"] == first
    assert "sha256 mismatch, downloading again" in result.stderr
    assert fake_hub.count("GET", "/model-00001-of-00002.safetensors") == 1
    assert cli("verify", "-c", cat, "--layout", tmp_path / "c").stdout == "tiny  ok\n"


def test_a_second_file_rotted_under_its_stamp_is_not_trusted_after_the_first(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, user_xattrs: None
) -> None:
    """Two files of one layer rotted, mtimes put back, stamps intact: the cached digest fails, the
    first bad file is downloaded again, and the retry checks the second too: no layer of rotten
    bytes is made, the model fails naming it."""
    cat = _setup(fake_hub, tmp_path)
    cli("build", "-c", cat, "--layout", tmp_path / "a")
    locked = {f["path"]: f["sha256"] for f in _lock(tmp_path / "catalog.lock")["models"]["tiny"]["files"]}
    snapshot = next((tmp_path / "hf-cache").glob("models--org--tiny/snapshots/*"))
    for name in ("config.json", "tokenizer.json"):  # one layer: the small files
        blob = (snapshot / name).resolve()
        st = blob.stat()
        blob.write_bytes(b"X" * st.st_size)
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert checked.is_stamped(blob, locked[name])
    fake_hub.requests.clear()
    result = cli("build", "-c", cat, "--layout", tmp_path / "b", code=1)
    assert "not the cached layer" in result.stderr
    assert fake_hub.count("GET", "/config.json") == 1  # the first one, downloaded again
    assert "tokenizer.json: sha256 " in result.stderr
    assert not (tmp_path / "b" / "index.json").exists() or "tiny" not in (tmp_path / "b" / "index.json").read_text()


def test_noop_rebuild_reads_no_weight_file(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _setup(fake_hub, tmp_path)
    cli("build", "-c", cat)
    shutil.rmtree(tmp_path / "hf-cache")  # nothing left to read: the rebuild must not need it
    fake_hub.requests.clear()
    result = cli("build", "-c", cat)
    assert fake_hub.requests == []
    assert _lock(tmp_path / "catalog.lock")["models"]["tiny"]["image"]["digest"] in result.stdout


def test_a_layer_is_built_while_other_files_still_download(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    files = {**FILES, "model-00002-of-00002.safetensors": BIG[::-1]}  # two large files, two layers
    fake_hub.add_repo("org/tiny", files)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    blobs = tmp_path / ".modelcar" / "oci" / "blobs" / "sha256"

    def a_weight_layer_is_stored() -> bool:
        found = blobs.glob("*") if blobs.is_dir() else []
        return any(re.fullmatch("[0-9a-f]{64}", p.name) and p.stat().st_size > len(BIG) for p in found)

    # The second weight is not sent until the first weight's layer is in the layout.
    fake_hub.hold_until["model-00002-of-00002.safetensors"] = a_weight_layer_is_stored
    cli("build", "-c", cat)
    assert fake_hub.held == {"model-00002-of-00002.safetensors": True}  # not sent after the time limit


def test_path_model_same_size_other_bytes_fails_before_anything_is_stored(cli: Cli, tmp_path: Path) -> None:
    config, cat = _locked_path_model(cli, tmp_path, '{"a": 1}')
    config.write_text('{"a": 2}')  # same size: only the sha256 tells
    result = cli("build", "-c", cat, code=2)
    assert "config.json: its content does not match the lock (sha256 " in result.stderr
    assert "modelcar lock --update m" in result.stderr
    assert not (tmp_path / ".modelcar" / "oci").exists()  # nothing stored from it


@pytest.mark.parametrize("push", [False, True])
def test_a_path_model_rewritten_in_place_after_its_build_is_not_rebuilt_from_the_old_layers(
    cli: Cli, registry: Registry, tmp_path: Path, push: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store holds the old layers, so no layer of the rebuilt model is read: the files are
    checked against the lock first (the image was "built" from the old weights, exit 0). Their
    check is noted in modelcar's cache: a rebuild of unchanged files reads none of them."""
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(BIG)
    (model / "config.json").write_text("{}")
    to = ["--push", "--registry", f"{registry.host}/mc"] if push else []
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat, *to)
    st = weights.stat()
    weights.write_bytes(BIG[::-1])  # retrained: the same size, its mtime put back
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = cli("build", "-c", cat, *to, code=2)
    assert f"{weights}: its content does not match the lock (sha256 " in result.stderr
    assert "modelcar lock --update m" in result.stderr
    cli("lock", "--update", "-c", cat)
    cli("build", "-c", cat, *to)
    assert cli("verify", "-c", cat).stdout == "m  ok\n"

    read: list[Path] = []
    stream_file = checked.stream_file
    monkeypatch.setattr(checked, "stream_file", lambda path, *a, **k: read.append(path) or stream_file(path, *a, **k))
    assert "(0 written, 2 already there)" in cli("build", "-c", cat, *to).stderr
    assert read == []


def test_json_says_why_a_build_failed_where_no_model_did(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """`--json` on every failed run: a result file that cannot be written, a lock step that failed."""
    _, cat = _locked_path_model(cli, tmp_path, "{}")
    where = tmp_path / "not-a-dir"
    where.write_text("")
    result = cli("build", "-c", cat, "--index", "0", "--result", where / "r.json", "--json", code=1)
    doc = json.loads(result.stdout)  # found before the build: no model built
    assert doc["models"] == [] and doc["error"].startswith(f"{where}: ")
    hub_cat = write_catalog(tmp_path / "hub" / "catalog.yaml", "models:\n  - name: gone\n    hf: org/gone\n")
    result = cli("build", "-c", hub_cat, "--json", code=2)
    doc = json.loads(result.stdout)
    assert doc["models"] == [] and "org/gone" in doc["error"]


def test_json_reports_every_model_when_one_fails(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.add_repo("org/other", {"config.json": b"{}\n"})
    cat = write_catalog(
        tmp_path / "catalog.yaml",
        CATALOG + "  - name: other\n    hf: org/other\n",
    )
    cli("lock", "-c", cat)
    fake_hub.inject("file", "corrupt", path="model-00001-of-00002.safetensors", methods=("GET",), times=2)
    result = cli("build", "-c", cat, "--json", code=1)
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert models["tiny"]["digest"] is None and "sha256 mismatch after two downloads" in models["tiny"]["error"]
    assert models["other"]["error"] is None
    assert models["other"]["digest"] == _lock(tmp_path / "catalog.lock")["models"]["other"]["image"]["digest"]
