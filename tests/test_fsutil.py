"""Files modelcar writes get the permissions a plain open() would give them."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcar import fsutil
from modelcar.fsutil import STALE_AFTER, atomic_write_bytes, create_beside, create_once, sweep_stale
from modelcar.stores.layout import LayoutStore


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_0666_less_the_umask(tmp_path: Path, umask_027: None) -> None:
    atomic_write_bytes(tmp_path / "catalog.lock", b"x")
    assert mode(tmp_path / "catalog.lock") == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.lock"]


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask_027: None) -> None:
    path = tmp_path / "kustomization.yaml"
    path.write_bytes(b"old")
    path.chmod(0o664)
    atomic_write_bytes(path, b"new")
    assert (path.read_bytes(), mode(path)) == (b"new", 0o664)


def test_layout_files_are_readable_by_others_under_umask_022(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = LayoutStore(tmp_path / "oci")
        digest = store.put_blob("m", 3, lambda: [b"abc"])
        store.put_manifest("m", b"{}", "application/vnd.oci.image.manifest.v1+json", ref="t")
    finally:
        os.umask(old)
    blob = tmp_path / "oci" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    for path in (blob, tmp_path / "oci" / "index.json", tmp_path / "oci" / "oci-layout"):
        assert mode(path) == 0o644, path


def test_sweep_removes_what_no_live_writer_holds(tmp_path: Path) -> None:
    fd, held = create_beside(tmp_path / "upload")  # this process writes it: locked
    _, left = create_beside(tmp_path / "upload")
    os.close(_)  # its writer died: the lock went with it
    young_fd, young = create_beside(tmp_path / "upload")
    os.close(young_fd)
    old = time.time() - 2 * STALE_AFTER
    for path in (held, left):
        os.utime(path, (old, old))
    try:
        assert sweep_stale(tmp_path, ".upload.*") == 1
        assert held.exists() and not left.exists() and young.exists()  # young: its writer may not have locked it yet
    finally:
        os.close(fd)


def test_a_temporary_file_that_cannot_be_removed_fails_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's, in a shared sticky directory, or on a read-only checkout: a no-op mirror or
    patch sweeping on its way failed on it."""
    _, left = create_beside(tmp_path / "upload")
    os.close(_)
    old = time.time() - 2 * STALE_AFTER
    os.utime(left, (old, old))

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    assert sweep_stale(tmp_path, ".upload.*") == 0


def test_locks_need_a_descriptor_open_for_writing_only_where_flock_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS clients emulate flock with POSIX locks: an exclusive one needs a file open for writing
    (flock(2), EBADF): a lock file's and a sweep's failed there. Elsewhere the catalog is opened
    only to read: opened for writing, whatever watches it would see it change."""
    path = tmp_path / "catalog.yaml"
    path.write_text("models: []\n")
    modes = []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        modes.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with fsutil.exclusive(path):
        pass
    assert modes[0] == os.O_RDONLY
    modes.clear()

    def nfs_flock(fd: int, operation: int) -> None:
        modes.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        if operation & fcntl.LOCK_EX and modes[-1] == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    with fsutil.exclusive(path):
        pass
    assert modes[:2] == [os.O_RDONLY, os.O_RDWR]
    _, left = create_beside(tmp_path / "upload")
    os.close(_)
    old = time.time() - 7200
    os.utime(left, (old, old))
    monkeypatch.setattr(fsutil, "_file_system", lambda directory: "nfs4")
    assert sweep_stale(tmp_path, ".upload.*") == 1 and not left.exists()


def test_a_connection_s_error_is_not_named_after_the_file_being_written() -> None:
    """A download writes into the HF cache while it reads from the network: a reset connection is
    the connection's, not the cache's."""
    for error in (
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
    ):
        with pytest.raises(OSError) as raised, fsutil.naming(Path("/cache")):
            raise error
        assert raised.value.filename is None, error
    with pytest.raises(OSError) as raised, fsutil.naming(Path("/cache")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == "/cache"


def test_ctrl_c_while_waiting_for_a_lock_leaves_no_descriptor_open(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text("models: []\n")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = len(os.listdir("/proc/self/fd"))
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with path.open() as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another run holds it
            for _ in range(3):
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                with pytest.raises(KeyboardInterrupt), fsutil.exclusive(path):
                    pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(os.listdir("/proc/self/fd")) == before


def test_on_a_network_file_system_a_quiet_temporary_file_is_kept_for_an_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its writer may be on another host, whose flock this host does not see (NFS with local locks)."""
    _, left = create_beside(tmp_path / "upload")
    os.close(_)
    minutes = time.time() - 600
    os.utime(left, (minutes, minutes))
    monkeypatch.setattr(fsutil, "_file_system", lambda directory: "nfs4")
    assert sweep_stale(tmp_path, ".upload.*") == 0 and left.exists()
    monkeypatch.setattr(fsutil, "_file_system", lambda directory: "ext4")
    assert sweep_stale(tmp_path, ".upload.*") == 1 and not left.exists()


def test_the_file_system_type_is_read_from_the_mount_table() -> None:
    """/proc is procfs on every Linux; a path below a mount point belongs to that mount."""
    fsutil._file_system.cache_clear()
    assert fsutil._file_system("/proc") == "proc"
    assert fsutil._file_system("/proc/self/fd") == "proc"
    assert fsutil.stale_after(Path("/proc")) == STALE_AFTER  # local: no host but this one writes there


def test_replacing_a_file_sweeps_what_a_killed_write_of_it_left(tmp_path: Path) -> None:
    lock = tmp_path / "catalog.lock"
    left_fd, left = create_beside(lock)  # a write that a kill -9 cut short: its lock died with it
    os.close(left_fd)
    held_fd, held = create_beside(lock)  # another writer, alive
    _, other = create_beside(tmp_path / "kustomization.yaml")
    os.close(_)
    old = time.time() - 2 * STALE_AFTER
    for path in (left, held, other):
        os.utime(path, (old, old))
    try:
        atomic_write_bytes(lock, b"models: {}\n")
        assert not left.exists() and held.exists()
        assert other.exists()  # another file's: swept when that file is written
        assert lock.read_bytes() == b"models: {}\n"
    finally:
        os.close(held_fd)


def test_create_once_never_replaces(tmp_path: Path) -> None:
    marker = tmp_path / "oci-layout"
    create_once(marker, b"first")
    inode = marker.stat().st_ino
    create_once(marker, b"second")  # another process that saw no marker a moment ago
    assert (marker.read_bytes(), marker.stat().st_ino) == (b"first", inode)  # the inode others lock stays
    assert [p.name for p in tmp_path.iterdir()] == ["oci-layout"]


def test_create_once_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # vfat, some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    create_once(tmp_path / "oci-layout", b"first")
    create_once(tmp_path / "oci-layout", b"second")
    assert (tmp_path / "oci-layout").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["oci-layout"]


def test_create_once_without_hard_links_leaves_nothing_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    real_fsync = os.fsync
    calls: list[int] = []

    def full_disk_at_the_second(fd: int) -> None:  # the first: the temporary file; the second: in place
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_at_the_second)
    with pytest.raises(OSError):
        create_once(tmp_path / "oci-layout", b"first")
    assert list(tmp_path.iterdir()) == []  # no empty marker that no later run would repair
    monkeypatch.setattr(os, "fsync", real_fsync)
    create_once(tmp_path / "oci-layout", b"second")
    assert (tmp_path / "oci-layout").read_bytes() == b"second"
