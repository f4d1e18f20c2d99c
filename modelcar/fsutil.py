"""Small file-system helpers shared by everything that writes user-visible files.

Files are replaced by rename so that a crash or Ctrl-C never leaves a half-written lock,
index.json or blob behind: readers see the old file or the new one, nothing in between.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import glob
import hashlib
import io
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from pathlib import Path
from queue import SimpleQueue
from typing import Any

log = logging.getLogger("modelcar")

READ_CHUNK = 8 << 20  # large reads into a reused buffer: hashing and copying run at disk speed
# What stream_file hands out at a time, and the size of a read that allocates what it returns: glibc
# maps an 8 MiB allocation fresh in a worker thread and gives it back when freed, every time
# (`verify` of a 1 GiB layout: 588k page faults and 2.9 s with 8 MiB reads, 9.4k and 1.6 s with these).
PIECE = 1 << 20

Chunk = bytes | memoryview
"""A piece of a stream; a memoryview may be of a reused buffer (see stream_file)."""


def create_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, empty, uniquely named file in `path`'s directory, to be renamed over `path` once
    complete, opened for writing.

    Created with mode 0o666 less the umask, as a plain `open()` would: `mkstemp`'s 0o600 left
    locks, kustomizations, layouts and archives unreadable to the next CI step running as another
    user (a kustomize or skopeo container).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:  # the directory's fault (read-only, another user's): named, not a file never made
            exc.filename = os.path.abspath(path.parent)
            raise
        with suppress(OSError):  # a file system without locks: sweep_stale cannot tell, and leaves it
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process lives: see sweep_stale
        return fd, tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


# Seconds since its last write before sweep_stale takes an unlocked temporary file for garbage:
# past the moment between its creation and its writer's lock; on a file system whose locks may
# not reach other hosts (NFS mounted with local locks, FUSE), past any stall of a live writer there.
STALE_AFTER = 10.0
STALE_AFTER_SHARED = 3600.0
# File systems other hosts may write to, whose flock this host may not see.
SHARED_FS = (
    *("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "vboxsf", "prl_fs"),
    *("ceph", "glusterfs", "lustre", "gpfs", "beegfs", "afs", "wekafs", "panfs"),
)
MEMORY_FS = ("tmpfs", "ramfs")  # their files are the page cache: nothing to write past


@functools.lru_cache(maxsize=64)
def _file_system(directory: str) -> str:
    """The type of the file system `directory` is on (/proc/self/mounts), "" where unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = directory == point or directory.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _file_system_of(directory: Path) -> str:
    return _file_system(str(directory.resolve()))


def _local(kind: str) -> bool:
    """Whether a file system of this type is this host's own (not a network or FUSE one, nor one of
    an unknown type)."""
    return bool(kind) and kind not in SHARED_FS and not kind.startswith("fuse")


def on_local_disk(directory: Path) -> bool:
    """Whether `directory` is on a file system of this host's own."""
    return _local(_file_system_of(directory))


def stale_after(directory: Path) -> float:
    """How long an unlocked temporary file in `directory` must have been left alone to be garbage."""
    return STALE_AFTER if on_local_disk(directory) else STALE_AFTER_SHARED


_swept: set[tuple[str, str]] = set()  # (directory, pattern) swept in this process
_swept_lock = threading.Lock()


def sweep_once(directory: Path, pattern: str) -> None:
    """sweep_stale the first time this process asks for `directory` and `pattern`. For a directory
    of one small file per item that grows without end (a cache's notes, its layer digests): swept
    for every note written, the N-th note listed N files (40,000 of them: 31 ms a note, a 4,000-file
    local model's lock 8.7 s instead of 1.3 s)."""
    key = (os.path.abspath(directory), pattern)
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    sweep_stale(directory, pattern)


TEMPS = ".*.tmp"  # the temporary files of atomic_write_bytes (create_beside), any file's


def sweep_temps(path: Path) -> int:
    """sweep_stale for the temporary files of `atomic_write_bytes(path)` that killed runs left."""
    return sweep_stale(path.parent, f".{glob.escape(path.name)}.*.tmp")


def locked_fd(path: Path, operation: int, flags: int = 0) -> int:
    """A descriptor of `path` that holds the flock `operation`. Opened for reading: opening the
    user's catalog for writing would signal a change to whatever watches it (an editor, a watch
    loop that reruns modelcar). NFS clients emulate flock with POSIX locks, where an exclusive one
    needs a descriptor open for writing (flock(2): EBADF): there it is opened again to read and write.
    Opened without blocking: a FIFO planted where a lock file belongs is refused, not waited on."""
    flags |= os.O_NONBLOCK | os.O_CLOEXEC
    fd = _lockable(os.open(path, os.O_RDONLY | flags), path, flags)
    try:
        fcntl.flock(fd, operation)
        return fd
    except BaseException as exc:  # Ctrl-C while waiting for the lock too: the descriptor goes
        os.close(fd)
        if not isinstance(exc, OSError) or exc.errno != errno.EBADF:
            raise
    fd = _lockable(os.open(path, os.O_RDWR | flags), path, flags)
    try:
        fcntl.flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lockable(fd: int, path: Path, flags: int) -> int:
    """`fd`, of a regular file (or of the directory `flags` asked for)."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) if flags & os.O_DIRECTORY else stat.S_ISREG(mode)):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a directory): not locked", str(path))
    return fd


def sweep_stale(directory: Path, pattern: str, lock_of: Callable[[Path], Path] | None = None) -> int:
    """Remove temporary files (from `create_beside`) that a killed run left behind in
    `directory`: each is locked by its writer while that process lives, so a file nobody holds is
    garbage (a SIGKILL or an OOM kill runs no cleanup; a 10 GB layer's temp file would stay).
    `lock_of` names the file whose lock its writer holds instead (another program's convention).
    Files written to within `stale_after` are left alone, and so is what cannot be removed here
    (another user's file in a shared directory, a read-only medium): it is no failure of the run."""
    removed = 0
    try:
        paths = list(directory.glob(pattern))
    except OSError:
        return 0
    age = stale_after(directory) if paths else 0.0
    for path in paths:
        try:
            if time.time() - path.stat().st_mtime < age:
                continue
            # not blocking, not following a link: a FIFO planted in a shared cache does not hang the run
            lock = lock_of(path) if lock_of else path
            fd = locked_fd(lock, fcntl.LOCK_EX | fcntl.LOCK_NB, os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, nothing to tell by, or a live writer holds it (or no locks here: cannot tell)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                path.unlink(missing_ok=True)
                removed += 1
        except OSError:
            continue  # not ours to remove (another user's, a read-only medium)
        finally:
            os.close(fd)
    return removed


def _write_synced(fd: int, data: bytes, mode: int | None = None) -> None:
    """Write `data` to the open file `fd` (with permission bits `mode`), on disk before it closes."""
    with os.fdopen(fd, "wb") as out:
        if mode is not None:
            os.fchmod(out.fileno(), mode)
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


# what ConnectionError and TimeoutError (ECONNRESET, ETIMEDOUT, ...) do not cover
NETWORK_ERRNOS = frozenset({errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH})


def _not_the_file_s(exc: OSError) -> bool:
    """An error of what was read (see source_errors) or of a connection, raised where a file was
    being written: a download writes into the HF cache while it reads from the network."""
    return (
        getattr(exc, "modelcar_source", False)
        or isinstance(exc, ConnectionError | TimeoutError)
        or type(exc).__module__ in ("ssl", "socket")  # SSLError, gaierror: no import of ssl for it
        or exc.errno in NETWORK_ERRNOS
    )


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside without a file name (a write's ENOSPC or EIO, an fsync's) gets
    `path`: the one-line error then says where the disk filled up. Not one a source raised (see
    `source_errors`): that is the source's, wherever it surfaced."""
    try:
        yield
    except OSError as exc:
        # an OS error (not a library's OSError("...")) of the writing, not of what was being read,
        # nor of a connection (a download writes where it reads from the network)
        if exc.filename is None and exc.errno is not None and not _not_the_file_s(exc):
            exc.filename = str(path)
        raise


def source_errors(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """`chunks`, with any OSError they raise marked as the source's: a writer that reads them
    inside `naming` (tarfile pulls its member's bytes inside addfile) does not take it for its own."""
    try:
        yield from chunks
    except OSError as exc:
        exc.modelcar_source = True  # type: ignore[attr-defined]
        raise


NOTE_MODE = 0o644  # a note's bits whatever the umask: a group-writable one (umask 002) would never count


def read_private(path: Path) -> bytes:
    """A small note's bytes, if it is a file only this user or root can have written (`private`);
    an OSError (PermissionError) otherwise, as for a note that is not there. Opened without
    blocking: a FIFO planted in a shared cache does not hang the run."""
    with os.fdopen(open_regular(path), "rb") as f:
        if not private(os.fstat(f.fileno())):
            raise PermissionError(f"{path}: written by another user, or writable by others: not trusted")
        return f.read()


def private(st: os.stat_result) -> bool:
    """Only this user or root can have written the file (root can write anything of this user's
    anyway): a note that spares a check (a stamp, a remembered layer digest) counts only then; in a
    shared cache another user could write it."""
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o022


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None, sweep: bool = True) -> None:
    """Replace `path` with `data`; a file that was there keeps its permission bits, unless `mode`
    gives them.

    The temporary files of earlier writes of `path` that a killed run left are swept first: they
    lie beside a lock file or a kustomization in a git checkout, where `git add -A` would commit them.
    Not with `sweep=False`: a directory of many small files (a cache's notes) is swept once per run
    instead (sweep_once), not listed whole for every file written.
    """
    tmp = staged(path, data, mode=mode, sweep=sweep)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staged(path: Path, data: bytes, *, mode: int | None = None, sweep: bool = True) -> Path:
    """A temporary file beside `path` holding `data`, on disk, with `path`'s permission bits (or
    `mode`): renamed over `path`, it replaces it in one step. Several staged before any is renamed,
    a directory that takes no new file fails the lot, not the last of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_temps(path)
    try:
        fd, tmp = create_beside(path)
    except OSError as exc:  # the directory takes no new file: say so, for the file it was to replace
        where = os.path.abspath(path.parent)  # `-c catalog.yaml` named it `.`
        exc.filename, exc.strerror = where, f"{exc.strerror} (a new {path.name} is made in it first)"
        raise
    try:
        if mode is None:
            with suppress(FileNotFoundError):
                mode = stat.S_IMODE(path.stat().st_mode)
        with naming(path):
            _write_synced(fd, data, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def can_create(path: Path) -> None:
    """Raise what writing `path` would (a directory in its place, a file where a directory of its
    should be, a directory that takes no new file), making nothing that stays: for a file written
    at the end of a long run."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # made by the write: the nearest that is there must take them
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    fd, tmp = create_beside(parent / path.name)
    os.close(fd)
    tmp.unlink()


def write_if_changed(path: Path, data: bytes) -> None:
    """atomic_write_bytes, unless `path` holds these bytes already: a run that changes nothing
    writes nothing (a layout or an HF cache on read-only media, another user's files)."""
    with suppress(OSError):  # not there, or no file (a FIFO: not waited on)
        if read_at_most(path, len(data)) == data:
            return
    atomic_write_bytes(path, data)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one step: a reader sees the old link or the new one, never no
    file (a server loading from an HF cache while a mirror runs again), and two runs linking the
    same file at once do not collide."""
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass
    staged = link.with_name(f".{link.name}.{secrets.token_hex(6)}.link")
    staged.symlink_to(target)
    try:
        os.replace(staged, link)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def create_once(path: Path, data: bytes) -> None:
    """Write `path` complete, unless it exists: then it is left as it is, inode and all. For a file
    others lock (a layout's `oci-layout`): replacing it would leave two processes each holding a
    lock on a different inode of the same name."""
    fd, tmp = create_beside(path)
    try:
        _write_synced(fd, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # no hard links here (vfat, some FUSE mounts): create it in place, once
            _create_in_place(path, data)
    finally:
        tmp.unlink(missing_ok=True)


def _create_in_place(path: Path, data: bytes) -> None:
    """`path` with `data` unless it exists; a failed write leaves no file behind (it would never be
    repaired: an existing file is left as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return
    try:
        _write_synced(fd, data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def tree_files(root: Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The files under `root` as a reader of the directory sees them (vLLM, `cp -rL`): relative
    POSIX paths, through links to files and to directories alike. And what cannot be read so,
    with what is wrong, for the caller to refuse only where its selection reaches: entries (a link
    that leads nowhere, as in an HF snapshot whose download never finished; a link loop), and
    directories (one that cannot be listed; a link back into its own ancestry)."""
    files: list[str] = []
    bad_entries: dict[str, str] = {}
    bad_dirs: dict[str, str] = {}

    def visit(directory: str, rel: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not rel:
                raise  # the model's directory itself
            bad_dirs[rel.rstrip("/")] = f"cannot be read ({exc.strerror})"
            return
        for entry in entries:
            path = f"{rel}{entry.name}"
            try:
                st = entry.stat()  # through links
            except FileNotFoundError:
                target = os.readlink(entry.path) if entry.is_symlink() else "?"
                bad_entries[path] = f"a link to {target}, which does not exist (a download that did not finish?)"
                continue
            except OSError as exc:
                bad_entries[path] = f"cannot be read ({exc.strerror})"
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    bad_dirs[path] = f"a link back to {os.path.realpath(entry.path)}, which holds it (a loop)"
                    continue
                visit(entry.path, path + "/", ancestors | {key})
            elif stat.S_ISREG(st.st_mode):
                files.append(path)

    top = root.stat()
    visit(str(root), "", frozenset({(top.st_dev, top.st_ino)}))
    return files, bad_entries, bad_dirs


def link_below(top: Path, path: Path) -> Path | None:
    """The first entry on the way down from `top` to `path` that is a symbolic link (how `top`
    itself is reached is its owner's choice: a cache on another disk), or `path` itself if it is not
    under `top` at all; None when the way is all directories of `top`'s own. `path` may be spelled
    from `top` as given or from where `top` really is (huggingface_hub resolves its cache's path)."""
    path = Path(os.path.abspath(path))
    for root in (Path(os.path.abspath(top)), Path(os.path.realpath(top))):
        if path.is_relative_to(root):
            here = root
            for part in path.relative_to(root).parts:
                here = here / part
                try:
                    if stat.S_ISLNK(os.lstat(here).st_mode):
                        return here
                except (FileNotFoundError, NotADirectoryError):  # the way ends here: what writes there says so
                    return None
            return None
    return path


def open_regular(path: Path) -> int:
    """A descriptor to read `path`, a regular file: opened without blocking, so a FIFO where a file
    should be (a snapshot link in a shared HF cache pointed at one) is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a directory)", str(path))
    return fd


def read_at_most(path: Path, cap: int) -> bytes | None:
    """A small file's bytes (a manifest, an index.json); None when it holds more than `cap`: a
    document planted at gigabytes is refused, not read into memory."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(cap + 1)
    return data if len(data) <= cap else None


def iter_file(path: Path, chunk: int = PIECE) -> Iterator[bytes]:
    with os.fdopen(open_regular(path), "rb") as f:
        while data := f.read(chunk):
            yield data


def stream_file(path: Path, chunk: int = READ_CHUNK, piece: int = PIECE) -> Iterator[memoryview]:
    """A file in large reads into one reused buffer, handed out as views of `piece` bytes: each
    view is valid only until the next is requested, so the consumer must hash, write or send it
    first (a layer stream does).

    No allocation per read keeps memory flat and low: with a new 8 MiB `bytes` per read, the
    buffers of parallel uploads fragmented the heap (peak RSS of a 1 GiB push: 129-148 MiB, with
    this 87-103 MiB, and ~10% less CPU). Small views, because the HTTP client copies what it sends
    (h11 joins the pieces of a write): a 1 MiB copy is reused by the allocator, an 8 MiB one is not.
    """
    buf = bytearray(chunk)
    view = memoryview(buf)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        while n := f.readinto(buf):
            for start in range(0, n, piece):
                yield view[start : min(n, start + piece)]


WRITEBACK_STEP = 32 << 20


class WriteBehind(io.BufferedWriter):
    """A file written front to back through the page cache, to be fsynced before its name says it
    is complete (a small blob or hf-cache file; a large one, an archive, where DirectWriter is not
    for the file system: see file_writer): the kernel is asked to start writing each
    WRITEBACK_STEP to disk as it comes, so the disk works while the stream is still hashed, and the
    fsync waits for the last few MiB instead of the whole file (a 1 GiB layout build, A/B runs on
    2 cores: 0.2-0.3 s of ~1.8 s less, before DirectWriter took the layout's large blobs).

    On Linux, POSIX_FADV_DONTNEED starts writeback of the range's dirty pages and drops only pages
    already clean: what was just written stays cached (checked with fincore) for a reader that follows.
    """

    def __init__(self, file: int | str | Path) -> None:
        super().__init__(io.FileIO(file, "w"))
        self._started = 0

    def write(self, data: Any) -> int:
        n = super().write(data)
        end = self.tell()
        if end - self._started >= WRITEBACK_STEP and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fileno(), self._started, end - self._started, os.POSIX_FADV_DONTNEED)
            self._started = end
        return n

    def rewind(self, offset: int) -> None:
        """Cut the file back to its first `offset` bytes and go on writing from there."""
        self.flush()
        self.seek(offset)
        self.truncate()
        self._started = min(self._started, offset)

    def sync(self) -> None:
        self.flush()
        os.fsync(self.fileno())


DIRECT_PIECE = 1 << 20  # one O_DIRECT write: as fast as larger ones on the disks measured, small in RSS
DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT writes: the largest logical block size in use


class DirectWriter:
    """A large file written front to back past the page cache (O_DIRECT), to be fsynced before its
    name says it is complete: a weight's blob in a layout, a weight file of an hf-cache mirror, an
    archive.

    Written through the cache, a layer of N GiB takes N GiB of new cache pages, which the kernel
    must find (on a VM, memory the host backs at first touch) and later write back. A 1 GiB layout
    build after a push on a 2-core VM: 1.6 s of system time for the cache's pages, and a wall
    time of 2.5-2.8 s against 1.5-1.7 s written this way; `dd` of 1 GiB: 0.06 s of system time
    direct, 0.25 s buffered with the pages reused and 2.6 s in new ones. What is written is read
    back from the disk by a push from the layout, which the upload outpaces anyway.

    O_DIRECT wants aligned memory, offsets and lengths: the bytes are gathered into page-aligned
    buffers of DIRECT_PIECE, and a thread writes one while the caller fills the other, so the disk
    works while the stream is still hashed. The last partial block is written through the cache.
    Where the file system takes no O_DIRECT (some FUSE and network file systems), the same writes
    go through the cache.
    """

    def __init__(self, fd: int) -> None:
        """Takes `fd` over once made; if making it fails (no thread to be had under a task limit,
        no memory), `fd` is left as it was, O_DIRECT off, for the caller to write otherwise."""
        self._fd = fd
        self._free: SimpleQueue[mmap.mmap] = SimpleQueue()
        self._full: SimpleQueue[tuple[mmap.mmap, int] | None] = SimpleQueue()
        self._buf, spare = mmap.mmap(-1, DIRECT_PIECE), mmap.mmap(-1, DIRECT_PIECE)
        self._free.put(spare)
        self._n = 0
        self._handed = 0  # bytes handed to the thread: the file's offset where the buffer starts
        self._error: BaseException | None = None
        self._ended = threading.Lock()  # guards `_done` and `_orphaned`: who closes the descriptor
        self._done = self._orphaned = False
        self.closed = False
        self._finished = False  # synced or closed: nothing more may be written
        self.direct = False
        self._writer = threading.Thread(target=self._write_out, name="direct-writer", daemon=True)
        self._writer.start()
        self.direct = _set_direct(fd, True)

    def write(self, data: Chunk) -> int:
        if self._finished:  # its buffer is the thread's, or gone: the bytes would be lost
            raise ValueError("write to a DirectWriter after sync or close")
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            k = min(DIRECT_PIECE - self._n, len(view))
            self._buf[self._n : self._n + k] = view[:k]
            self._n += k
            view = view[k:]
            if self._n == DIRECT_PIECE:
                self._full.put((self._buf, self._n))
                self._handed += self._n
                self._buf, self._n = self._free.get(), 0  # the buffer the thread has written out
                if self._error is not None:
                    raise self._error
        return size

    def _write_out(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    self._write_all(buf, n)
            except BaseException as exc:  # handed to the caller at its next write or sync
                self._error = exc.with_traceback(None)
            finally:
                self._free.put(buf)
        with self._ended:
            self._done = True
            if self._orphaned:  # close() could not wait for this thread: the descriptor is its to close
                os.close(self._fd)

    def _write_all(self, buf: mmap.mmap, n: int) -> None:
        with memoryview(buf) as whole:
            view = whole[:n]
            while view:
                if self.direct and len(view) % DIRECT_ALIGN:  # the last partial block
                    if len(view) > DIRECT_ALIGN:
                        view = view[self._write(view[: len(view) - len(view) % DIRECT_ALIGN]) :]
                        continue
                    self.direct = _set_direct(self._fd, False)
                view = view[self._write(view) :]

    def _write(self, view: memoryview) -> int:
        try:
            return os.write(self._fd, view)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self.direct = _set_direct(self._fd, False)  # a file system that takes the flag, not the writes
            return 0

    def tell(self) -> int:
        return self._handed + self._n

    def rewind(self, offset: int) -> None:
        """Cut the file back to its first `offset` bytes and go on writing from there (an archive's
        member that failed midway). Cut below what the thread has written, the rest of the file
        goes through the cache unless `offset` is aligned."""
        if offset >= self._handed:  # still in the buffer
            self._n = offset - self._handed
            return
        self._free.put(self._free.get())  # the spare is back: no write of the thread's is in flight
        if self._error is not None:
            raise self._error
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._handed, self._n = offset, 0
        if offset % DIRECT_ALIGN:
            self.direct = _set_direct(self._fd, False)

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> None:
        """Write out what is left, wait for the thread, and fsync. The last thing written: a write
        after it is an error."""
        if self.closed:
            raise ValueError("sync of a closed DirectWriter")
        if not self._finished:
            self._finished = True
            self._full.put((self._buf, self._n))
            self._handed += self._n
            self._n = 0
        self._stop()
        if self._error is not None:
            raise self._error
        os.fsync(self._fd)

    def _stop(self) -> None:
        if self._writer.is_alive():
            self._full.put(None)
            self._writer.join()

    def close(self) -> None:
        """Wait for the thread, and close the file. Interrupted while waiting (a Ctrl-C), the thread
        closes it after its last write: the descriptor is not closed, nor its number reused, under
        a write in flight. The buffers go with the last reference to them."""
        if self.closed:
            return
        self.closed = self._finished = True
        try:
            self._stop()
        finally:
            with self._ended:
                if self._done:
                    os.close(self._fd)
                else:
                    self._orphaned = True


DIRECT_FROM = 8 << 20  # files this large are written past the page cache, on a local disk


def file_writer(fd: int, directory: Path, size: int | None) -> DirectWriter | WriteBehind:
    """The writer of a new file of `size` bytes in `directory` (None: not known before, as an
    archive's, which holds weights); it takes `fd` over, closed here if no writer can be made.
    Past the page cache for a large file on a local disk (DirectWriter); through it for a small
    one, in memory (tmpfs), on a network file system (where each direct write would be a round
    trip to the server and a commit there; cached writes are batched), and where no writer thread
    can be started (a container's task limit)."""
    try:
        kind = _file_system_of(directory) if size is None or size >= DIRECT_FROM else ""
        if _local(kind) and kind not in MEMORY_FS:
            try:
                return DirectWriter(fd)
            except (RuntimeError, OSError) as exc:  # "can't start new thread", no memory to map
                log.debug("%s: writing through the page cache: %s", directory, exc)
        return WriteBehind(fd)
    except BaseException:
        os.close(fd)
        raise


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is on."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:  # EINVAL: this file system takes no O_DIRECT
        return False
    return on


def sha256_file(path: Path) -> str:
    """sha256 of a file in large reads into one buffer: no allocation per chunk, so many of
    these in parallel threads keep memory at one buffer each."""
    h = hashlib.sha256()
    for view in stream_file(path, piece=READ_CHUNK):
        h.update(view)
    return h.hexdigest()


def exclusive(path: Path) -> AbstractContextManager[None]:
    """Hold an exclusive advisory lock on an existing file that is never replaced.

    Files we replace by rename cannot carry the lock themselves, so the lock sits on a stable
    neighbour (the catalog for its lock file, `oci-layout` for a layout's index.json).
    """
    return _flocked(path, fcntl.LOCK_EX)


def shared(path: Path) -> AbstractContextManager[None]:
    """Hold a shared lock where writers hold `exclusive`, for a run that only reads what they change
    (`patch --check`): it waits for a writer, not for other readers, and needs no descriptor open
    for writing (NFS, for a catalog this user may not write)."""
    return _flocked(path, fcntl.LOCK_SH)


@contextmanager
def directories_locked(directories: Iterable[Path], *, share: bool = False) -> Iterator[None]:
    """Each of these directories that exists, locked itself (exclusive, or shared with `share`),
    one after another in sorted order: runs that lock overlapping sets wait for each other, and
    never each for the other. One whose file system takes no lock on a directory (NFS emulates
    flock with POSIX locks, which want a descriptor open for writing) is passed over."""
    with ExitStack() as held:
        for directory in sorted(set(directories)):
            try:
                fd = locked_fd(directory, fcntl.LOCK_SH if share else fcntl.LOCK_EX, os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                continue  # made by the run, if at all
            except OSError as exc:
                log.debug("%s: not locked (%s)", directory, exc)
                continue
            held.callback(os.close, fd)
        yield


@contextmanager
def _flocked(path: Path, operation: int) -> Iterator[None]:
    fd = locked_fd(path, operation)
    try:
        yield
    finally:
        os.close(fd)  # which lets go of the lock: it is this descriptor's alone


class ChunkReader(io.RawIOBase):
    """A stream of chunks as a readable file, hashing every byte handed out.

    Lets tarfile read (or write) straight from a blob stream while its digest is checked in the
    same pass: no second read, no temp copy.
    """

    def __init__(self, chunks: Iterable[Chunk]) -> None:
        self._chunks = iter(chunks)
        self._buf = memoryview(b"")
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        """Fill `b` as far as the stream goes, across chunks of any size: tarfile takes a short
        read for the end of the data."""
        out = memoryview(b).cast("B")
        filled = 0
        while filled < len(out):
            if not self._buf:
                try:
                    self._buf = memoryview(next(self._chunks)).cast("B")
                except StopIteration:
                    break
                continue
            n = min(len(out) - filled, len(self._buf))
            out[filled : filled + n] = self._buf[:n]
            self.hash.update(self._buf[:n])
            self._buf = self._buf[n:]
            filled += n
        self.count += filled
        return filled

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def drain(self) -> None:
        """Read what is left, so the hash covers the whole stream (tar padding, end blocks)."""
        while self.read(PIECE):
            pass

    def ends_as(self, digest: str, size: int) -> bool:
        """Read what is left; whether the whole stream was `size` bytes with this digest."""
        self.drain()
        return self.digest == digest and self.count == size
