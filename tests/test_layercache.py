"""The layer digest cache: what it remembers, and what it takes from images in a store."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from modelcar.image import ANN_LAYER_KEY, MEDIA_LAYER, Descriptor
from modelcar.layercache import LayerCache


def test_layer_digests_learned_from_an_image_do_not_replace_proven_ones(tmp_path: Path) -> None:
    """What an image in a registry claims is taken only where nothing is known: a tag someone
    moved to an image whose annotations lie does not decide what the next build reuses."""
    cache = LayerCache(tmp_path)
    key_a, key_b, key_c = "a" * 64, "b" * 64, "c" * 64
    cache.put(key_a, "sha256:" + "1" * 64, 100)  # proven here: a store accepted it under this digest

    def layer(key: str, digest: str) -> Descriptor:
        return Descriptor(MEDIA_LAYER, "sha256:" + digest * 64, 100, {ANN_LAYER_KEY: key})

    assert cache.learn([layer(key_a, "2"), layer(key_b, "3")]) == 1
    assert cache.digest(key_a, 100) == "sha256:" + "1" * 64 and cache.digest(key_b, 100) == "sha256:" + "3" * 64
    assert cache.learn([layer(key_c, "4"), layer("d" * 64, "4")]) == 0  # one blob, two keys: no image of ours
    assert cache.learn([layer(key_c, "4"), layer(key_c, "5"), layer("d" * 64, "4")]) == 0  # and one key, two blobs
    assert cache.digest(key_c, 100) is None and cache.digest("d" * 64, 100) is None


def test_what_an_image_claims_holds_for_the_run_that_read_it_only(tmp_path: Path) -> None:
    """A lock from an untrusted pull request names an `earlier` image whose layer carries the real
    files' key over other bytes: the next build on that runner, from a clean lock, must not reuse it
    without reading a file. Only what this machine made from checked files is written down."""
    cache = LayerCache(tmp_path)
    claimed = Descriptor(MEDIA_LAYER, "sha256:" + "6" * 64, 100, {ANN_LAYER_KEY: "a" * 64})
    assert cache.learn([claimed]) == 1 and cache.digest("a" * 64, 100) == claimed.digest  # this run: reused
    assert LayerCache(tmp_path).digest("a" * 64, 100) is None  # the next run: not taken
    assert not (tmp_path / "layers" / ("a" * 64)).exists()
    cache.put("b" * 64, "sha256:" + "7" * 64, 100)  # made here, accepted by a store
    assert LayerCache(tmp_path).digest("b" * 64, 100) == "sha256:" + "7" * 64


def test_a_key_an_image_claims_names_no_file_outside_the_cache(tmp_path: Path) -> None:
    """A layer key comes from an annotation of an image in a registry and names a file in the
    cache: only the shape modelcar makes (64 lowercase hex) is taken."""
    cache = LayerCache(tmp_path / "cache")
    bad = ["../../planted", "A" * 64, "a" * 63, "a" * 65, "a" * 63 + "/"]
    layers = [Descriptor(MEDIA_LAYER, f"sha256:{i}" + "0" * 63, 100, {ANN_LAYER_KEY: k}) for i, k in enumerate(bad)]
    assert cache.learn(layers) == 0
    assert not (tmp_path / "planted").exists() and not list((tmp_path / "cache").rglob("*"))
    assert all(cache.get(k) is None for k in bad)


def test_a_digest_is_remembered_for_its_size_only(tmp_path: Path) -> None:
    """A registry's HEAD does not check a blob's size: a digest remembered at another size (an
    image's annotations that lie) must not stand for this layer."""
    cache = LayerCache(tmp_path)
    cache.put("e" * 64, "sha256:" + "1" * 64, 100)
    assert cache.digest("e" * 64, 100) == "sha256:" + "1" * 64
    assert cache.digest("e" * 64, 101) is None
    assert LayerCache(tmp_path).digest("e" * 64, 101) is None  # read back from its file, the same


def test_an_entry_another_user_could_have_written_is_not_trusted(tmp_path: Path) -> None:
    """A shared cache (HF_HOME on a group directory): an entry counts only where nobody else can
    have written it, as for the stamps; modelcar's own are written so whatever the umask."""
    cache = LayerCache(tmp_path)
    old = os.umask(0o002)
    try:
        cache.put("a" * 64, "sha256:" + "1" * 64, 100)
    finally:
        os.umask(old)
    entry = tmp_path / "layers" / ("a" * 64)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o644
    assert LayerCache(tmp_path).digest("a" * 64, 100) == "sha256:" + "1" * 64  # the next run's
    entry.chmod(0o664)  # the group may write it
    assert LayerCache(tmp_path).digest("a" * 64, 100) is None
    if os.geteuid() == 0:  # another owner: only root can hand a file over
        entry.chmod(0o644)
        os.chown(entry, 4242, -1)
        assert LayerCache(tmp_path).digest("a" * 64, 100) is None
    LayerCache(tmp_path).put("a" * 64, "sha256:" + "1" * 64, 100)  # proven again: the entry is this user's now
    assert LayerCache(tmp_path).digest("a" * 64, 100) == "sha256:" + "1" * 64


def test_a_fifo_in_place_of_an_entry_does_not_hang_the_run(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    (tmp_path / "layers").mkdir()
    os.mkfifo(tmp_path / "layers" / ("e" * 64))  # planted in a shared cache: opening it would block
    found: list[str | None] = []
    reader = threading.Thread(target=lambda: found.append(cache.digest("e" * 64, 100)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and found == [None]


def test_an_entry_of_root_s_counts_for_another_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root can write this user's files anyway: its entries count (a cache warmed as root, read by a
    CI step running as a user); another user's do not."""
    LayerCache(tmp_path).put("a" * 64, "sha256:" + "1" * 64, 100)
    entry = tmp_path / "layers" / ("a" * 64)
    owner = entry.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: 54321)  # this run is another user's
    assert LayerCache(tmp_path).digest("a" * 64, 100) == ("sha256:" + "1" * 64 if owner == 0 else None)
    if owner == 0:
        os.chown(entry, 4242, -1)
        assert LayerCache(tmp_path).digest("a" * 64, 100) is None


def test_a_cache_directory_is_listed_once_a_run_not_once_per_entry_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file per layer (and per local file checked), never pruned: swept for killed runs'
    temporary files at every write, writing the N-th entry listed N files (40,000 entries: 31 ms
    each). Swept once per run now, and a killed run's temporary file still goes."""
    import modelcar.fsutil as fsutil
    from modelcar.checked import LocalNotes

    listed: list[Path] = []
    real = fsutil.sweep_stale

    def counted(directory: Path, pattern: str, lock_of: object = None) -> int:
        listed.append(Path(directory))
        return real(directory, pattern)

    monkeypatch.setattr(fsutil, "sweep_stale", counted)
    monkeypatch.setattr(fsutil, "_swept", set())
    monkeypatch.setattr(fsutil, "stale_after", lambda directory: 0.0)
    (tmp_path / "layers").mkdir()
    left = tmp_path / "layers" / f".{0:064x}.0123456789ab.tmp"  # a killed run's
    left.write_text("partial")
    cache = LayerCache(tmp_path)
    for n in range(20):
        cache.put(f"{n:064x}", "sha256:" + f"{n:064x}", n)
    notes, files = LocalNotes(tmp_path), []
    for n in range(20):
        f = tmp_path / f"file{n}"
        f.write_bytes(b"x")
        files.append(f)
        notes.remember(f, "0" * 64, os.stat(f))
    assert sorted(map(str, listed)) == sorted([str(tmp_path / "layers"), str(tmp_path / "checked")])
    assert not left.exists()
    assert all(LayerCache(tmp_path).digest(f"{n:064x}", n) == "sha256:" + f"{n:064x}" for n in range(20))
    assert all(LocalNotes(tmp_path).checked(f, "0" * 64) for f in files)
