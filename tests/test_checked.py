"""Files checked against the lock as they stream, and the stamp that spares a second check."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

from modelcar import checked
from modelcar.checked import STAMP, LocalNotes, Stamps, is_stamped, read_checked
from modelcar.tarlayer import Member, SourceChanged, TarParams, entries, iter_layer

DATA = os.urandom(3 << 20)  # several stream_file pieces


def _file(tmp_path: Path, data: bytes = DATA) -> tuple[Path, Member]:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    return path, Member("w.safetensors", len(data), hashlib.sha256(data).hexdigest())


def _read(path: Path, member: Member, *, remember: bool) -> bytes:
    return b"".join(bytes(c) for c in read_checked(path, member, notes=Stamps() if remember else None))


def _rot(path: Path) -> None:
    """Change one byte in place and put the mtime back: what a stat cannot see."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(12345)
        (byte,) = f.read(1)
        f.seek(12345)  # the read moved past it: written there, the next byte changed only 255 times in 256
        f.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bad_bytes_fail_after_the_last_chunk_and_nothing_is_stamped(tmp_path: Path, user_xattrs: None) -> None:
    path, member = _file(tmp_path)
    _rot(path)
    chunks = []
    with pytest.raises(SourceChanged, match=r"w\.safetensors: sha256 [0-9a-f]{64}, the lock has ") as info:
        for chunk in read_checked(path, member, notes=Stamps()):
            chunks.append(len(chunk))
    assert info.value.member == member
    assert sum(chunks) == len(DATA)  # every byte went by: a store checks the stream's end too late to commit
    assert not is_stamped(path, member.sha256)
    with pytest.raises(OSError):
        os.getxattr(path, STAMP)


def test_a_checked_file_is_stamped_and_read_unhashed_until_its_mtime_moves(tmp_path: Path, user_xattrs: None) -> None:
    path, member = _file(tmp_path)
    assert _read(path, member, remember=True) == DATA
    st = path.stat()
    assert os.getxattr(path, STAMP) == f"{member.sha256} {len(DATA)} {st.st_mtime_ns}".encode()
    assert is_stamped(path, member.sha256) and not is_stamped(path, "0" * 64)

    _rot(path)  # the stamp is trusted: the changed byte is not seen
    assert len(_read(path, member, remember=True)) == len(DATA)
    # ... unless the caller does not take stamps (a user's own directory) ...
    with pytest.raises(SourceChanged):
        _read(path, member, remember=False)
    # ... or anything that wrote the file moved its mtime.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(SourceChanged):
        _read(path, member, remember=True)


def test_a_stamp_counts_only_on_a_file_nobody_else_may_write(tmp_path: Path, user_xattrs: None) -> None:
    path, member = _file(tmp_path)
    assert _read(path, member, remember=True) == DATA and is_stamped(path, member.sha256)
    mode = path.stat().st_mode
    os.chmod(path, mode | 0o020)  # a shared cache: the group may write it (and its stamp)
    assert not is_stamped(path, member.sha256)
    _rot(path)
    with pytest.raises(SourceChanged):
        _read(path, member, remember=True)
    if os.geteuid() == 0:  # another owner: only root can hand a file over
        os.chmod(path, mode)
        path.write_bytes(DATA)  # the good bytes again, under a new mtime
        assert _read(path, member, remember=True) == DATA and is_stamped(path, member.sha256)
        os.chown(path, 4242, -1)
        assert not is_stamped(path, member.sha256)


def test_without_remember_nothing_is_stamped(tmp_path: Path, user_xattrs: None) -> None:
    path, member = _file(tmp_path)
    assert _read(path, member, remember=False) == DATA
    assert not is_stamped(path, member.sha256)


def test_a_file_that_changes_while_read_is_not_stamped(tmp_path: Path, user_xattrs: None) -> None:
    path, member = _file(tmp_path)
    stream = read_checked(path, member, notes=Stamps())
    next(stream)
    st = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, so the ctime surely moves
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # written to mid-read, its mtime put back: ctime moved
    assert sum(len(c) for c in stream) == len(DATA) - (1 << 20)
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    assert not is_stamped(path, member.sha256)
    assert _read(path, member, remember=True) == DATA  # read again undisturbed: stamped
    assert is_stamped(path, member.sha256)


def test_no_xattrs_means_every_read_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(checked.os, "setxattr", refuse)
    path, member = _file(tmp_path)
    assert _read(path, member, remember=True) == DATA
    assert not is_stamped(path, member.sha256)
    _rot(path)
    with pytest.raises(SourceChanged):
        _read(path, member, remember=True)


def test_a_layer_stream_of_checked_files_fails_on_the_bad_one(tmp_path: Path) -> None:
    good, bad = b"weights", b"WEIGHTS"
    (tmp_path / "a.bin").write_bytes(good)
    (tmp_path / "b.bin").write_bytes(bad)
    members = [Member(p, len(good), hashlib.sha256(good).hexdigest()) for p in ("a.bin", "b.bin")]
    stream = iter_layer(entries(members, TarParams()), lambda m: read_checked(tmp_path / m.path, m))
    with pytest.raises(SourceChanged) as info:
        b"".join(stream)
    assert info.value.member.path == "b.bin"


def test_local_notes_see_a_rewrite_whose_mtime_is_put_back(tmp_path: Path) -> None:
    """A user's own file gets no stamp: its note is in modelcar's cache, and holds the ctime that
    a rewrite moves whatever mtime it puts back (a model retrained to the same size)."""
    (tmp_path / "model").mkdir()
    path, member = _file(tmp_path / "model")
    notes = LocalNotes(tmp_path / "cache")
    assert b"".join(bytes(c) for c in read_checked(path, member, notes=notes)) == DATA
    assert notes.checked(path, member.sha256) and not notes.checked(path, "0" * 64)
    assert list(path.parent.iterdir()) == [path]  # nothing written beside the user's file
    with pytest.raises(OSError):
        os.getxattr(path, STAMP)
    later = LocalNotes(tmp_path / "cache")  # a later run: the note on disk is all it has
    assert later.checked(path, member.sha256)
    note = next((tmp_path / "cache" / "checked").iterdir())
    note.chmod(0o666)  # a shared cache: another user could have written it
    assert not later.checked(path, member.sha256)
    note.chmod(0o644)
    time.sleep(0.05)  # past the file system's timestamp tick, so the ctime surely moves
    _rot(path)
    assert not notes.checked(path, member.sha256) and not later.checked(path, member.sha256)
    with pytest.raises(SourceChanged):
        b"".join(bytes(c) for c in read_checked(path, member, notes=notes))


def test_local_notes_hold_for_the_run_where_the_cache_takes_none(tmp_path: Path) -> None:
    """MODELCAR_CACHE not writable here: a `path:` file checked before the build was hashed again
    when its layer was read (the note went nowhere); this run keeps it in memory."""
    (tmp_path / "model").mkdir()
    path, member = _file(tmp_path / "model")
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    notes = LocalNotes(tmp_path / "cache")
    assert b"".join(bytes(c) for c in read_checked(path, member, notes=notes)) == DATA
    assert notes.checked(path, member.sha256)
    assert not LocalNotes(tmp_path / "cache").checked(path, member.sha256)  # kept nowhere else
