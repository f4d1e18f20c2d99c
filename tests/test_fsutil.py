"""Files modelcar writes get the permissions a plain open() would give them."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelcar import fsutil
from modelcar.errors import os_error_message
from modelcar.fsutil import STALE_AFTER, atomic_write_bytes, create_beside, create_once, sweep_stale
from modelcar.stores.layout import LayoutStore
from tests.conftest import missing, require_tool


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


def _cached_bytes(path: Path) -> int:
    """How much of `path` the page cache holds, as util-linux's fincore counts it."""
    out = subprocess.run(
        [require_tool("fincore"), "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def _direct_io(directory: Path) -> bool:
    """Whether writes in `directory` can go past the page cache: a file system that takes O_DIRECT
    and has a disk under it (tmpfs takes it since Linux 6.6, and caches all the same)."""
    if fsutil._file_system(str(directory.resolve())) in fsutil.MEMORY_FS:
        return False
    try:
        os.close(os.open(directory / ".direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        (directory / ".direct-probe").unlink(missing_ok=True)
    return True


def _odd_pieces(data: bytes, sizes: Iterator[int]) -> Iterator[memoryview]:
    view = memoryview(data)
    while view:
        n = next(sizes)
        yield view[:n]
        view = view[n:]


@pytest.mark.parametrize("tail", [0, 1, 4095, 4097])
def test_a_large_blob_goes_past_the_page_cache_and_reads_back_whole(tmp_path: Path, tail: int) -> None:
    """A layout's weight blob takes no page cache (the kernel would have to find as many new pages
    as the model is large); every byte arrives, whatever the pieces it comes in and however the
    end falls against the disk's blocks."""
    if not _direct_io(tmp_path):
        missing(f"{tmp_path}'s file system takes no O_DIRECT: set TMPDIR to one that does")
    data = os.urandom(3 * fsutil.DIRECT_PIECE + 5 * fsutil.DIRECT_ALIGN + tail)
    fd, path = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    assert out.direct
    for piece in _odd_pieces(data, itertools.cycle([777_777, 1, 4096, 1 << 20])):
        out.write(piece)
    out.sync()
    out.close()
    assert path.read_bytes() == data
    # 3 MiB and more written, at most the last partial block through the cache (read_bytes above
    # goes direct to the kernel's cache too: fincore's count is taken before it by a second file).
    fd, again = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    out.write(data)
    out.sync()
    out.close()
    assert _cached_bytes(again) <= fsutil.DIRECT_ALIGN


def test_where_o_direct_is_refused_the_same_bytes_go_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that takes the flag but refuses aligned direct writes (some FUSE file systems
    answer EINVAL), or refuses the flag itself: the blob is written all the same."""
    data = os.urandom(2 * fsutil.DIRECT_PIECE + 100)
    real_write = os.write

    def no_direct_writes(fd: int, buf: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", no_direct_writes)
    fd, path = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    out.write(data)
    out.sync()
    out.close()
    assert path.read_bytes() == data and not out.direct

    real_fcntl = fcntl.fcntl

    def no_direct_flag(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct_flag)
    fd, path = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    assert not out.direct
    out.write(data)
    out.sync()
    out.close()
    assert path.read_bytes() == data


def test_a_failed_direct_write_is_raised_to_the_writer_and_the_thread_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the thread writes: the caller's next write or its sync raises that
    error (the layout names the blobs directory around both), and close leaves no thread behind."""
    real_write = os.write
    written = [0]

    def full_after_a_mib(fd: int, buf: Any) -> int:
        if written[0] >= fsutil.DIRECT_PIECE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, buf)
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", full_after_a_mib)
    before = threading.active_count()
    fd, _ = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    with pytest.raises(OSError) as raised:
        for _ in range(8):
            out.write(b"x" * fsutil.DIRECT_PIECE)
        out.sync()
    assert raised.value.errno == errno.ENOSPC
    out.close()
    assert threading.active_count() == before


def test_large_blobs_of_a_layout_or_an_hf_cache_go_past_the_page_cache_on_a_local_disk_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS each direct write would be a round trip and a commit on the server: there a blob goes
    through the cache, as do small ones anywhere."""
    import io

    from modelcar.hfcache import _write_blob

    if not _direct_io(tmp_path):
        missing(f"{tmp_path}'s file system takes no O_DIRECT: set TMPDIR to one that does")
    large, small = os.urandom(fsutil.DIRECT_FROM + 1000), os.urandom(fsutil.DIRECT_FROM - 4096)
    cases = [
        *(("ext4", large, False), ("xfs", large, False), ("ext4", small, True)),
        *(("nfs4", large, True), ("virtiofs", large, True), ("fuse", large, True), ("tmpfs", large, True)),
    ]
    for kind, data, cached in cases:
        monkeypatch.setattr(fsutil, "_file_system", lambda directory, kind=kind: kind)
        where = tmp_path / f"{kind}-{len(data)}"
        store = LayoutStore(where / "oci")
        digest = store.put_blob("m", len(data), lambda data=data: [data])
        assert (_cached_bytes(store.blob_path(digest)) > len(data) // 2) == cached, (kind, len(data))
        assert hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest() == digest.removeprefix("sha256:")
        sha256 = hashlib.sha256(data).hexdigest()
        (where / "hf").mkdir()
        _write_blob(io.BytesIO(data), where / "hf" / sha256, len(data), sha256, "org/m: model.safetensors")
        assert (_cached_bytes(where / "hf" / sha256) > len(data) // 2) == cached, (kind, len(data))
        assert (where / "hf" / sha256).read_bytes() == data


def test_a_layout_sweeps_the_partial_blobs_killed_builds_left_under_either_name(tmp_path: Path) -> None:
    """Releases before 5361e20 named a partial blob `.upload-XXXXXXXX` (mkstemp's): each a weight
    file's size at most, left for good in a layout a newer modelcar builds into."""
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    left = [blobs / ".upload-k2j3h4l5", blobs / ".upload.0123456789ab.tmp"]
    young = blobs / ".upload-abcdefgh"  # a writer of that release may be at work on it
    old = time.time() - 2 * STALE_AFTER
    for path in [*left, young]:
        path.write_bytes(b"partial")
    for path in left:
        os.utime(path, (old, old))
    LayoutStore(tmp_path / "oci").refs()
    assert [p.exists() for p in left] == [False, False] and young.exists()


def test_where_no_writer_thread_can_be_started_a_large_blob_goes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a container's task limit each direct writer's thread is one task more: `can't start
    new thread` failed builds that had fitted before, and leaked the blob's descriptor."""
    start = threading.Thread.start

    def no_more_tasks(self: threading.Thread) -> None:
        if self.name == "direct-writer":
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_more_tasks)
    monkeypatch.setattr(fsutil, "_file_system", lambda directory: "ext4")
    fds = len(os.listdir("/proc/self/fd"))
    store = LayoutStore(tmp_path / "oci")
    data = os.urandom(fsutil.DIRECT_FROM + 4097)
    for _ in range(3):
        digest = store.put_blob("m", len(data), lambda: [data])
    assert store.blob_path(digest).read_bytes() == data
    assert len(os.listdir("/proc/self/fd")) == fds


def test_ctrl_c_while_closing_a_direct_writer_leaves_its_descriptor_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted while waiting for the thread's last writes, close() freed the buffers the thread
    was writing from (BufferError) and never closed the file."""
    real_write = os.write
    writing = threading.Event()

    def slow_write(fd: int, buf: Any) -> int:
        writing.set()
        time.sleep(0.3)
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", slow_write)
    fd, path = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    out.write(b"x" * (2 * fsutil.DIRECT_PIECE))  # both buffers handed to the thread
    assert writing.wait(5)
    thread = out._writer

    def interrupted(timeout: float | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(thread, "join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        out.close()
    os.fstat(fd)  # still open: the thread writes to it
    threading.Thread.join(thread, 10)
    assert not thread.is_alive()
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    assert path.stat().st_size == 2 * fsutil.DIRECT_PIECE  # what was handed over was written


@pytest.mark.parametrize("cut", [700, fsutil.DIRECT_PIECE, fsutil.DIRECT_PIECE + 512])
def test_a_direct_writer_cut_back_goes_on_from_there(tmp_path: Path, cut: int) -> None:
    """An archive cuts a member that failed midway off again and writes on from where it began:
    within the buffer, at an aligned offset the thread has written past, or at a tar block's."""
    if not _direct_io(tmp_path):
        missing(f"{tmp_path}'s file system takes no O_DIRECT: set TMPDIR to one that does")
    data, more = os.urandom(3 * fsutil.DIRECT_PIECE + 100), os.urandom(5000)
    fd, path = create_beside(tmp_path / "archive")
    with fsutil.DirectWriter(fd) as out:
        if cut < fsutil.DIRECT_PIECE:
            out.write(data[:1000])  # all of it still in the buffer
        else:
            out.write(data)
        out.rewind(cut)
        assert out.tell() == cut
        # cut below what is written, at an unaligned offset: the rest goes through the cache
        assert out.direct == (cut < fsutil.DIRECT_PIECE or cut % fsutil.DIRECT_ALIGN == 0)
        out.write(more)
        assert out.tell() == cut + len(more)
        out.sync()
    assert path.read_bytes() == data[:cut] + more


def test_an_archive_goes_past_the_page_cache_on_a_local_disk(tmp_path: Path) -> None:
    """An archive is a copy of every blob it holds, rewritten whole when a model is added to it: on
    a mirror host that is as many new cache pages as the archive is large."""
    from modelcar.stores.archive import ArchiveStore

    if not _direct_io(tmp_path):
        missing(f"{tmp_path}'s file system takes no O_DIRECT: set TMPDIR to one that does")
    data = os.urandom(fsutil.DIRECT_FROM + 1000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with ArchiveStore(tmp_path / "models.tar", write=True) as store:
        store.put_blob("m", len(data), lambda: [data], digest)
    assert _cached_bytes(tmp_path / "models.tar") <= 2 * fsutil.DIRECT_ALIGN
    with ArchiveStore(tmp_path / "models.tar") as store:
        assert b"".join(store.open_blob("m", digest)) == data


def test_a_direct_writer_refuses_writes_after_its_sync_or_close(tmp_path: Path) -> None:
    """A write after sync was lost without a word, and one after close waited forever for a buffer."""
    fd, path = create_beside(tmp_path / "blob")
    out = fsutil.DirectWriter(fd)
    out.write(b"a" * 100)
    out.sync()
    out.sync()  # again: nothing more to write, and no error
    with pytest.raises(ValueError, match="after sync or close"):
        out.write(b"b")
    out.close()
    with pytest.raises(ValueError, match="after sync or close"):
        out.write(b"c")
    with pytest.raises(ValueError, match="closed"):
        out.sync()
    assert path.read_bytes() == b"a" * 100


def test_a_directory_that_takes_no_new_file_is_named_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-c catalog.yaml` in a directory this user may not write: the error named `.`."""

    def refused(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(fsutil, "create_beside", refused)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(Path("catalog.lock"), b"models: {}\n")
    assert os_error_message(raised.value) == (f"{tmp_path}: Permission denied (a new catalog.lock is made in it first)")


def test_a_temporary_file_that_cannot_be_made_names_its_directory(tmp_path: Path) -> None:
    """`build --no-cache` into a read-only layout named `.upload.fcad62eab3f6.tmp`, a file that
    never was: the directory is what refused it."""
    with pytest.raises(OSError) as raised:
        create_beside(tmp_path / "gone" / "upload")
    assert raised.value.filename == str(tmp_path / "gone")


def test_directories_locked_takes_each_that_exists_and_lets_go(tmp_path: Path) -> None:
    import fcntl

    from modelcar.fsutil import directories_locked

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()

    def free(directory: Path) -> bool:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with directories_locked([b, a, a]):  # b is not there (yet): passed over
        assert not free(a)
    assert free(a)


def test_a_fifo_where_a_file_should_be_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A snapshot link in a shared HF cache pointed at a FIFO: the build waited for a writer forever."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    reads = (
        lambda: list(fsutil.iter_file(fifo)),
        lambda: list(fsutil.stream_file(fifo)),
        lambda: fsutil.read_at_most(fifo, 10),
    )
    for read in reads:
        with pytest.raises(OSError, match="not a regular file") as caught:
            read()
        assert f"{fifo}: not a regular file" in os_error_message(caught.value)


def test_a_small_file_is_read_only_up_to_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "manifest"
    path.write_bytes(b"0123456789")
    assert fsutil.read_at_most(path, 10) == b"0123456789"
    assert fsutil.read_at_most(path, 9) is None
