"""OCI image layouts and archives as stores: what they hold is whole, named and on disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from modelcar.errors import IntegrityError
from modelcar.image import MEDIA_MANIFEST, digest_of
from modelcar.stores import layout as layout_module
from modelcar.stores import read_image
from modelcar.stores.archive import ArchiveStore
from modelcar.stores.layout import LayoutStore
from tests.conftest import Cli, write_catalog


def _built(cli: Cli, tmp_path: Path) -> tuple[Path, Path]:
    """A local model with a weights file built into the default layout: (catalog, layout)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(os.urandom(17 * 1024 * 1024))
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat)
    return cat, tmp_path / ".modelcar" / "oci"


def test_many_writers_naming_images_in_one_layout_lose_no_name(tmp_path: Path) -> None:
    """index.json is read, changed and written under the layout's lock: builds of different models
    into one layout at once (a CI machine's shared layout) keep every name."""
    layout = LayoutStore(tmp_path / "oci")

    def name_images(writer: int) -> None:
        for i in range(20):
            data = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "n": [writer, i]}).encode()
            layout.put_manifest(f"m{writer}", data, MEDIA_MANIFEST, ref=f"m{writer}-{i}")

    threads = [threading.Thread(target=name_images, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(layout.refs()) == 160


def test_a_layout_sees_the_names_another_writer_added_since_it_last_read_them(tmp_path: Path) -> None:
    """index.json is parsed once per content: another writer's replacement is read, and kept when
    this store names an image after it."""
    mine, other = LayoutStore(tmp_path / "oci"), LayoutStore(tmp_path / "oci")

    def manifest(n: int) -> bytes:
        return json.dumps({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "n": n}).encode()

    mine.put_manifest("m", manifest(0), MEDIA_MANIFEST, ref="m0")
    assert mine.named_digest("m", "m1") is None
    other.put_manifest("m", manifest(1), MEDIA_MANIFEST, ref="m1")
    assert mine.named_digest("m", "m1") == digest_of(manifest(1))
    mine.put_manifest("m", manifest(2), MEDIA_MANIFEST, ref="m2")
    assert sorted(other.refs()) == ["m0", "m1", "m2"]
    other.put_manifest("m", manifest(3), MEDIA_MANIFEST, ref="m0")  # replaces m0's entry
    assert mine.named_digest("m", "m0") == digest_of(manifest(3))


def test_a_layout_parses_its_index_once_for_any_number_of_lookups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build of hundreds of models into one layout looks each one up (its earlier image, its tags):
    index.json was parsed for every lookup, and for every name written."""
    layout = LayoutStore(tmp_path / "oci")
    for i in range(5):
        layout.put_manifest("m", json.dumps({"n": i}).encode(), MEDIA_MANIFEST, ref=f"m{i}")
    parsed: list[str] = []
    real = layout_module.parse_index
    monkeypatch.setattr(layout_module, "parse_index", lambda data, where: parsed.append(where) or real(data, where))
    fresh = LayoutStore(tmp_path / "oci")
    for _ in range(3):
        for i in range(6):
            assert (fresh.named_digest("m", f"m{i}") is None) == (i == 5)
            assert layout.named_digest("m", f"m{i}") == fresh.named_digest("m", f"m{i}")
    assert len(parsed) == 1  # `fresh`'s first lookup; `layout` wrote the version it reads
    layout.put_manifest("m", json.dumps({"n": 5}).encode(), MEDIA_MANIFEST, ref="m5")
    assert fresh.named_digest("m", "m5") is not None
    assert len(parsed) == 2


def test_an_index_another_tool_wrote_with_an_escaped_surrogate_is_written_back(tmp_path: Path) -> None:
    layout = LayoutStore(tmp_path / "oci")
    layout.put_manifest("m", b'{"n": 0}', MEDIA_MANIFEST, ref="m0")
    doc = json.loads((tmp_path / "oci" / "index.json").read_text())
    doc["annotations"] = {"org.example.note": "\ud800"}
    (tmp_path / "oci" / "index.json").write_text(json.dumps(doc))  # "\\ud800": valid JSON, no valid UTF-8
    LayoutStore(tmp_path / "oci").put_manifest("m", b'{"n": 1}', MEDIA_MANIFEST, ref="m1")
    written = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert written["annotations"] == doc["annotations"] and sorted(layout.refs()) == ["m0", "m1"]


@pytest.mark.parametrize("link", ["blobs", "blobs/sha256"])
def test_a_layout_whose_blobs_directory_is_a_link_is_not_written_through(tmp_path: Path, link: str) -> None:
    """Whoever may write a layout pointed `blobs` elsewhere: a mirror wrote blobs of content the
    mirrored image chooses, named by their digests, into that directory, and swept files there."""
    layout = LayoutStore(tmp_path / "oci")
    layout.put_manifest("m", b'{"n": 0}', MEDIA_MANIFEST, ref="m0")
    victim = tmp_path / "victim"
    shutil.copytree(tmp_path / "oci" / "blobs", victim)  # what the link leads to reads as the layout's
    planted = victim / "sha256" / ".upload.old"  # what the sweep of a killed run's temp files takes
    planted.write_text("theirs")
    os.utime(planted, (0, 0))
    shutil.rmtree(tmp_path / "oci" / link)
    (tmp_path / "oci" / link).symlink_to(victim if link == "blobs" else victim / "sha256")
    before = sorted(p.name for p in (victim / "sha256").iterdir())
    fresh = LayoutStore(tmp_path / "oci")
    assert fresh.named_digest("m", "m0") == digest_of(b'{"n": 0}')  # read as it is
    with pytest.raises(IntegrityError, match=f"oci/{link}: a symbolic link in an OCI layout"):
        fresh.put_blob("m", 5, lambda: [b"bytes"])
    assert sorted(p.name for p in (victim / "sha256").iterdir()) == before


def test_a_fifo_or_a_link_where_a_lock_file_belongs_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Whoever may write the directory planted a FIFO where modelcar takes its lock (a build waited
    forever), or a link leading nowhere (the archive's lock file was made wherever it led)."""
    layout = LayoutStore(tmp_path / "oci")
    layout.put_manifest("m", b'{"n": 0}', MEDIA_MANIFEST, ref="m0")
    (tmp_path / "oci" / "oci-layout").unlink()
    os.mkfifo(tmp_path / "oci" / "oci-layout")
    with pytest.raises(OSError, match="not a regular file"):
        layout.put_manifest("m", b'{"n": 1}', MEDIA_MANIFEST, ref="m1")
    os.mkfifo(tmp_path / "a.tar.lock")
    with pytest.raises(OSError, match="not a regular file"):
        ArchiveStore(tmp_path / "a.tar", write=True)
    (tmp_path / "b.tar.lock").symlink_to(tmp_path / "made-elsewhere")
    with pytest.raises(OSError):
        ArchiveStore(tmp_path / "b.tar", write=True)
    assert not (tmp_path / "made-elsewhere").exists()


def test_a_blob_of_another_size_than_said_is_never_named(tmp_path: Path) -> None:
    layout = LayoutStore(tmp_path / "oci")
    with pytest.raises(IntegrityError, match="expected 10 bytes, got 5"):
        layout.put_blob("r", 10, lambda: [b"short"])
    assert not any((tmp_path / "oci" / "blobs" / "sha256").iterdir())  # neither the blob nor its temp file


def test_a_blob_is_on_disk_before_its_name_says_it_is_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the rename and the write-back would leave a blob named for bytes it lacks:
    the file is synced first."""
    layout = LayoutStore(tmp_path / "oci")
    layout.put_blob("r", 1, lambda: [b"a"])  # the layout's own files are written (and synced) first
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), replace(a, b))[1])
    digest = layout.put_blob("r", 3, lambda: [b"abc"])
    named = events.index(f"replace {digest.removeprefix('sha256:')}")
    assert "fsync" in events[:named], events


def test_an_hf_cache_blob_is_on_disk_before_its_name_and_stamp_say_it_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mirror --to hf-cache:` seeds a cache that servers load from with no Hub to fall back on; a
    blob it named, and stamped as checked, lacked its bytes after a crash."""
    from modelcar.hfcache import _write_blob

    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), replace(a, b))[1])
    target = tmp_path / "blobs" / "blob"
    target.parent.mkdir()
    _write_blob(io.BytesIO(b"abc"), target, 3, hashlib.sha256(b"abc").hexdigest(), "m: x")
    assert events == ["fsync", "replace blob"] and target.read_bytes() == b"abc"


def test_an_archive_made_with_tar_of_a_layout_directory_is_read(cli: Cli, tmp_path: Path) -> None:
    """`tar -C layout -cf x.tar .` names its members ./index.json, ./blobs/...: an OCI archive all
    the same (skopeo reads it)."""
    cat, layout = _built(cli, tmp_path)
    archive = tmp_path / "by-hand.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    digest = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]["m"]["image"]["digest"]
    assert read_image(ArchiveStore(archive), "m", digest).digest == digest
    assert cli("verify", "-c", cat, "--from", f"oci-archive:{archive}").stdout == "m  ok\n"


def test_documents_planted_at_gigabytes_are_refused_not_read(cli: Cli, tmp_path: Path) -> None:
    """An archive carried across an air gap, a layout on a shared disk: a manifest blob, an
    index.json or an extended tar header that claims gigabytes (sparse, a few KB on disk) was read
    into memory whole (3-6 GiB) before any digest was checked."""
    from modelcar.stores import MANIFEST_MAX
    from modelcar.tarlayer import EXTENDED_MAX

    cat, layout = _built(cli, tmp_path)
    digest = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]["m"]["image"]["digest"]
    # a layout's manifest
    planted = tmp_path / "planted"
    shutil.copytree(layout, planted)
    os.truncate(planted / "blobs" / "sha256" / digest[7:], MANIFEST_MAX + 1)
    error = json.loads(cli("inspect", f"oci:{planted}:m", "--json", code=1).stdout)["error"]
    assert error == f"oci:{planted}: {digest[7:]}: larger than {MANIFEST_MAX} bytes: not a manifest"
    # an archive's manifest member
    archive = tmp_path / "planted.tar"
    with tarfile.open(archive, "w") as out:
        for path in sorted(p for p in layout.rglob("*") if p.is_file()):
            name = str(path.relative_to(layout))
            info = out.gettarinfo(path, name)
            if name.endswith(digest[7:]):
                info.size = MANIFEST_MAX + 1
                out.addfile(info, io.BytesIO(bytes(info.size)))
            else:
                with path.open("rb") as f:
                    out.addfile(info, f)
    error = json.loads(cli("inspect", f"oci-archive:{archive}:m", "--json", code=1).stdout)["error"]
    assert (
        error == f"oci-archive:{archive}: blobs/sha256/{digest[7:]}: larger than {MANIFEST_MAX} bytes: not a manifest"
    )
    # an extended header that claims more than any of ours
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, EXTENDED_MAX + 1
    bomb = tmp_path / "pax.tar"
    bomb.write_bytes(pax.tobuf(tarfile.USTAR_FORMAT))
    os.truncate(bomb, 2 * EXTENDED_MAX)
    error = json.loads(cli("inspect", f"oci-archive:{bomb}:m", "--json", code=1).stdout)["error"]
    assert error.startswith(f"oci-archive:{bomb}: cannot read the archive (") and str(EXTENDED_MAX) in error, error


def test_an_archive_replaced_while_it_is_read_is_read_as_it_was_opened(cli: Cli, tmp_path: Path) -> None:
    """A mirror into an archive replaces its file (a new one, renamed over it): a reader opened
    before read by the old offsets from the new file, got another member's bytes, and called the
    archive damaged."""
    cat, layout = _built(cli, tmp_path)
    archive = tmp_path / "models.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    digest = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]["m"]["image"]["digest"]
    with ArchiveStore(archive) as reader:
        other = tmp_path / "other.tar"  # the same members in another order: every offset moves
        names = sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file())
        subprocess.run(["tar", "-C", str(layout), "-cf", str(other), *reversed(names)], check=True)
        os.replace(other, archive)
        image = read_image(reader, "m", digest)
        for blob in image.blobs():
            assert digest_of(b"".join(reader.open_blob("m", blob.digest))) == blob.digest
    with pytest.raises(Exception, match="closed"):
        reader.blob_head("m", digest, 10)


def test_a_mirror_replaces_a_truncated_blob_the_destination_holds(cli: Cli, tmp_path: Path) -> None:
    """A blob file cut short (a copy interrupted by hand, a full disk) under its right name: a
    mirror into that layout sends it again, whatever its name says."""
    cat, layout = _built(cli, tmp_path)
    dest = tmp_path / "dest"
    shutil.copytree(layout, dest)
    weights = max((dest / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    whole = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(1000)
    cli("mirror", "-c", cat, "--to", f"oci:{dest}")
    assert weights.stat().st_size == whole
    assert digest_of(weights.read_bytes()) == "sha256:" + weights.name
    assert cli("verify", "-c", cat, "--from", f"oci:{dest}").stdout == "m  ok\n"
