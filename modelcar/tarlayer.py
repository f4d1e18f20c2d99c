"""Layer tar streams, generated on the fly from the files they carry.

A layer is tar headers, the file bytes, padding and the end-of-archive blocks. Its bytes are a
pure function of the member list (path, size, content) and the tar parameters, so a layer can be
sized before it is read, streamed straight from the Hugging Face cache to a store, and hashed
to the same digest on any machine. Headers come from the standard library's PAX encoder, with
every field that could vary between machines (mtime, owner, mode) fixed.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from gzip import GzipFile
from pathlib import PurePosixPath
from typing import IO

from modelcar.errors import InputError, IntegrityError
from modelcar.fsutil import Chunk

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
ROOT = "models"
FILE_MODE = 0o644
DIR_MODE = 0o755


@dataclass(frozen=True)
class TarParams:
    """What besides the files decides a layer's bytes; part of every layer cache key."""

    mtime: int = 0

    @classmethod
    def from_env(cls) -> TarParams:
        """SOURCE_DATE_EPOCH, the reproducible-builds convention, else the epoch."""
        raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        if not raw:
            return cls()
        try:
            value = int(raw)
        except ValueError:
            raise InputError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer number of seconds") from None
        if value < 0:
            raise InputError(f"SOURCE_DATE_EPOCH={raw!r} must not be negative")
        return cls(mtime=value)


@dataclass(frozen=True)
class Member:
    """A file as a layer carries it: its path in the repo, size and sha256 (from the lock)."""

    path: str
    size: int
    sha256: str


def _header(name: str, *, size: int, is_dir: bool, params: TarParams) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = DIR_MODE if is_dir else FILE_MODE
    info.mtime = params.mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def dir_header(path: str, params: TarParams) -> bytes:
    """Header of the directory `path` (a POSIX path under the image root, no trailing slash)."""
    return _header(path + "/", size=0, is_dir=True, params=params)


def file_header(path: str, size: int, params: TarParams) -> bytes:
    return _header(path, size=size, is_dir=False, params=params)


def padding(size: int) -> int:
    return -size % BLOCK


def is_safe_path(repo_path: str) -> bool:
    """Whether a repo path stays inside the directory it is joined to: relative, no `..`, no
    empty or `.` part, no NUL. What the Hub lists and what a lock says are checked with it before
    either names a file anywhere (a layer, the HF cache)."""
    return "\0" not in repo_path and not any(p in ("", ".", "..") for p in repo_path.split("/"))


WHITEOUT = ".wh."  # an image layer's deletion marker (OCI image-spec, layer.md "Whiteouts")
WHITEOUT_REASON = f"a name starting with '{WHITEOUT}' is a whiteout in image layers (runtimes delete it)"
EXCLUDE_WHITEOUTS = 'exclude: [".wh.*", "*/.wh.*"]'  # catalog patterns for them, and only them


def is_whiteout(repo_path: str) -> bool:
    """Whether a repo file cannot go into an image layer as itself. A path part named `.wh.*` is a
    whiteout there: runtimes unpack it as the deletion of its namesake (`.wh..wh..opq`: of all
    beside it, a base image's files too), never as a file, so the pod would not see it while the
    layer's digest and `verify` said it was there (containerd and podman both drop it)."""
    return any(part.startswith(WHITEOUT) for part in repo_path.split("/"))


def member_name(repo_path: str) -> str:
    """The tar member name of a repo file: `models/<path>`, no leading `./`."""
    if not is_safe_path(repo_path):
        raise ValueError(f"{repo_path!r} is not a safe relative path")
    if is_whiteout(repo_path):
        raise ValueError(f"{repo_path}: {WHITEOUT_REASON}")
    return f"{ROOT}/{repo_path}"


@dataclass(frozen=True)
class Entry:
    """One tar entry: a directory (no member) or a file member."""

    name: str
    header: bytes
    member: Member | None


def entries(members: Iterable[Member], params: TarParams) -> list[Entry]:
    """Tar entries of one layer, members in path order, each preceded by its missing parents.

    Every layer carries its own parent directories (with fixed mode 0755), so a layer unpacks
    the same alone or on top of the others.
    """
    out: list[Entry] = []
    seen_dirs: set[str] = set()
    for member in sorted(members, key=lambda m: m.path):
        name = member_name(member.path)
        parents = list(reversed(PurePosixPath(name).parents))[1:]  # drop "."
        for parent in parents:
            p = parent.as_posix()
            if p not in seen_dirs:
                seen_dirs.add(p)
                out.append(Entry(p + "/", dir_header(p, params), None))
        out.append(Entry(name, file_header(name, member.size, params), member))
    return out


def layer_size(layer_entries: Iterable[Entry]) -> int:
    total = len(END_OF_ARCHIVE)
    for e in layer_entries:
        total += len(e.header)
        if e.member is not None:
            total += e.member.size + padding(e.member.size)
    return total


ChunkSource = Callable[[Member], Iterator[Chunk]]


class SourceChanged(IntegrityError):
    """A file's bytes differ from what the lock (and the tar header) promise."""

    def __init__(self, message: str, member: Member, seen: os.stat_result | None = None) -> None:
        super().__init__(message)
        self.member = member
        self.seen = seen  # the file read, where known: what a replacement may throw away


def iter_layer(layer_entries: Iterable[Entry], read: ChunkSource) -> Iterator[Chunk]:
    """The layer's bytes, chunk by chunk: never more than one read chunk in memory.

    A file of another size than its header says raises SourceChanged before the end of the
    stream, so no store commits the blob; `read` may check the content too (checked.read_checked).
    """
    for e in layer_entries:
        yield e.header
        if e.member is None:
            continue
        written = 0
        for chunk in read(e.member):
            written += len(chunk)
            if written > e.member.size:
                break
            yield chunk
        if written != e.member.size:
            raise SourceChanged(
                f"{e.member.path}: expected {e.member.size} bytes, the source has "
                f"{'more' if written > e.member.size else written}",
                e.member,
            )
        if pad := padding(e.member.size):
            yield b"\0" * pad
    yield END_OF_ARCHIVE


EXTENDED_MAX = 1 << 20  # bytes of one extended header (PAX, GNU long name) a read takes at most


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads an extended header (PAX records, a GNU long name) into memory whole, and
    before any digest is checked: a 3 MiB gzip layer whose first header claimed 3 GiB took verify
    to 9 GB. Ours are a few hundred bytes."""

    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        self._bounded()
        info: tarfile.TarInfo = super()._proc_pax(archive)  # type: ignore[misc]
        return info

    def _proc_gnulong(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        self._bounded()
        info: tarfile.TarInfo = super()._proc_gnulong(archive)  # type: ignore[misc]
        return info

    def _bounded(self) -> None:
        if self.size > EXTENDED_MAX:
            raise tarfile.HeaderError(f"an extended header of {self.size} bytes (at most {EXTENDED_MAX} are read)")


def read_files(
    layer: IO[bytes] | io.RawIOBase, *, gzip: bool = False, odd: list[str] | None = None
) -> Iterator[tuple[str, int, IO[bytes]]]:
    """(repo path, size, reader) of each file under `models/` in a layer, in stream order.

    Reads the layer as a stream (tarfile's `r|`), so a layer is never held or seeked; the
    reader of each file is valid until the next one is requested. `gzip`: a compressed layer (a
    base image's), read to its last gzip member (tarfile's own `r|gz` stops after the first, and
    an eStargz layer has one member per file). Entries under `models/` that are neither files
    nor directories (a symlink, a hard link, a device) are skipped, and listed in `odd` when it
    is given: in a model image they would put something else where a file of the lock should be.
    """
    source = GzipFile(fileobj=layer, mode="rb") if gzip else layer
    with tarfile.open(fileobj=source, mode="r|", tarinfo=BoundedTarInfo) as tf:
        for info in tf:
            name = info.name.removeprefix("./")
            if not name.startswith(ROOT + "/"):
                continue
            if not info.isfile():
                if odd is not None and not info.isdir():
                    kind = "a link to" if info.issym() else "a hard link to" if info.islnk() else "a special file"
                    odd.append(f"{name[len(ROOT) + 1 :]}: {kind} {info.linkname}".rstrip())
                continue
            f = tf.extractfile(info)
            assert f is not None
            yield name[len(ROOT) + 1 :], info.size, f
