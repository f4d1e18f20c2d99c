"""An OCI image layout packed in one tar file (`oci-archive:FILE.tar`), for air-gapped transfer.

Reading seeks straight to each member's bytes, so a multi-GB archive is never unpacked. Writing
streams blobs into a new tar beside the target as they arrive, then carries over the blobs of the
archive that was there which the final index.json's images still use (a re-pinned model's old
weights are not carried from one air-gap transfer to the next), appends `index.json` and
`oci-layout` and renames the result into place: an interrupted mirror leaves the old archive
untouched.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
import threading
from collections.abc import Generator, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any, cast

from modelcar.errors import (
    BlobNotFound,
    DigestMismatch,
    IntegrityError,
    ModelcarError,
    error_message,
    os_error_message,
)
from modelcar.fsutil import (
    PIECE,
    ChunkReader,
    DirectWriter,
    WriteBehind,
    create_beside,
    exclusive,
    file_writer,
    naming,
    source_errors,
    sweep_stale,
)
from modelcar.image import digest_of
from modelcar.stores import INDEX_MAX, MANIFEST_MAX, BlobSource, Store, read_image
from modelcar.stores.layout import LAYOUT_VERSION, blob_hex, index_document, parse_index, ref_name, with_ref
from modelcar.tarlayer import BoundedTarInfo

log = logging.getLogger("modelcar")

MEMBERS_MAX = 100_000  # members of an archive read at most: one per blob (a model has tens), and three files


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = ""
    return info


class ArchiveStore(Store):
    blobs_shared = True

    def __init__(self, path: Path, *, write: bool = False, rewrite: bool = False) -> None:
        self.path = Path(path)
        self.write = write
        self.rewrite = rewrite  # the old archive's blobs are written anew, not carried over
        self._members: dict[str, tarfile.TarInfo] = {}
        self._index: list[dict[str, Any]] = []
        self._index_doc: dict[str, Any] = {}  # what else the archive's index.json says: kept
        self._loaded_index: list[dict[str, Any]] | None = None
        self._out: tarfile.TarFile | None = None
        self._file: DirectWriter | WriteBehind | None = None  # what _out writes into
        self._tmp: Path | None = None
        self._written: set[str] = set()
        self._put: dict[str, bytes] = {}  # manifests put in this run, by digest
        self._broken: str | None = None  # why the file being written can no longer be finished
        self._abandoned = False  # given up while a blob's copy held the lock (see _finish)
        self._lock = threading.Lock()
        self._guard = ExitStack()
        self._unwritable: OSError | None = None  # why no writer lock could be had: raised at a write
        # The archive as it was opened, read by offset through this one descriptor: a mirror that
        # replaces the file meanwhile (a new inode) changes nothing for this reader.
        self._source: int | None = None
        self._reading = threading.Condition()
        self._readers = 0  # preads in flight
        if write:
            # One writer at a time: a second mirror into the same archive waits, then starts from
            # what the first one wrote, instead of replacing it with its own view.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = self.path.with_name(self.path.name + ".lock")
            try:
                # made if missing, never touched: another user of a shared directory may hold it
                # open (touch() needs to own it or write it; flock needs only to read it)
                # (not through a link, which made the file it led to wherever that was; not waiting
                # on a FIFO planted there)
                flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                os.close(os.open(lock_file, flags, 0o666))
                self._guard.enter_context(exclusive(lock_file))
            except OSError as exc:
                if not self.path.exists():
                    raise
                # Read-only media, another user's directory: no run can write the archive there,
                # so none needs the lock; a mirror that brings nothing new goes through.
                self._unwritable = exc
            # left by a killed run: gone now, also when this one has nothing to write (a no-op mirror)
            sweep_stale(self.path.parent, f".{glob.escape(self.path.name)}.*.partial")
        if self.path.exists():
            try:
                self._load()
            except BaseException:
                self._guard.close()  # the writer lock, not held on for an archive that cannot be read
                raise
        elif not write:
            raise ModelcarError(f"oci-archive:{self.path}: no such file")

    def __str__(self) -> str:
        return f"oci-archive:{self.path}"

    def _load(self) -> None:
        try:
            self._source = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            with (
                os.fdopen(os.dup(self._source), "rb") as listing,
                tarfile.open(fileobj=listing, mode="r:", tarinfo=BoundedTarInfo) as tf,
            ):
                for n, m in enumerate(tf, 1):
                    if n > MEMBERS_MAX:  # each is kept in memory: an archive of empty members is no image's
                        raise ModelcarError(f"{self}: more than {MEMBERS_MAX} members: not an archive of images")
                    if m.isfile():
                        self._members[m.name.removeprefix("./")] = m
                index = self._members.get("index.json")
                if index is None:
                    raise ModelcarError(f"{self}: not an OCI archive (no index.json)")
                if index.size > INDEX_MAX:
                    raise ModelcarError(f"{self}: index.json: larger than {INDEX_MAX} bytes: not an index.json")
                f = tf.extractfile(index)
                assert f is not None
                self._index_doc = parse_index(f.read(), f"{self}: index.json")
                self._index = list(self._index_doc.get("manifests") or [])
                self._loaded_index = list(self._index)
        except (tarfile.TarError, OSError, ValueError) as exc:
            self._release()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # not the descriptor's number
            raise ModelcarError(f"{self}: cannot read the archive ({why})") from None
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        with self._reading:
            source, self._source = self._source, None  # no read starts now
            self._reading.wait_for(lambda: self._readers == 0)
        if source is not None:
            os.close(source)

    # --- writing ------------------------------------------------------------------------------

    def _writer(self) -> tarfile.TarFile:
        if self._out is None:
            if not self.write:
                raise ModelcarError(f"{self}: opened for reading only")
            if self._unwritable is not None:
                raise self._unwritable
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = create_beside(self.path, ".partial")
            self._file = file_writer(fd, self.path.parent, None)
            # Each member's bytes copied 1 MiB at a time (tarfile's default: 16 KiB, a Python call
            # each); the writer is write-only: tarfile in "w" mode only writes and tells.
            self._out = tarfile.TarFile(
                fileobj=cast(IO[bytes], self._file), mode="w", format=tarfile.PAX_FORMAT, copybufsize=PIECE
            )
        return self._out

    def _kept(self) -> set[str] | None:
        """The old archive's blobs the new one needs: those of the images its final index.json
        names (another tool's too). None, every blob kept, when an entry is not an image this can
        read through (an artifact of another kind)."""
        kept: set[str] = set()
        for entry in self._index:
            try:
                image = read_image(self, "", str(entry["digest"]))
                used = {image.digest, *(d.digest for d, _ in image.manifests), *(b.digest for b in image.blobs())}
                kept |= {self._blob_name(digest) for digest in used}  # a sha512 blob: not one of ours to judge
            except (ModelcarError, KeyError, TypeError, ValueError) as exc:
                log.debug("%s: %s: every blob kept: %s", self, entry.get("digest"), exc)
                return None
        return kept

    def _carry_over(self, out: tarfile.TarFile) -> None:
        kept = self._kept()
        for name, member in self._members.items():
            if name.startswith("blobs/") and name not in self._written and (kept is None or name in kept):
                reader = ChunkReader(self._read(member))
                with naming(self.path):
                    out.addfile(_member(name, member.size), reader)
                # its bytes are hashed on the way: a blob that rotted is not carried on as good
                if name.startswith("blobs/sha256/") and reader.digest != "sha256:" + name[len("blobs/sha256/") :]:
                    self._broken = (
                        f"{name} in the archive is damaged (its bytes give {reader.digest}); the archive is "
                        f"left as it was: move it aside and mirror into a new one"
                    )
                    raise self._not_written()
                self._written.add(name)

    def close(self, commit: bool = True) -> None:
        try:
            self._finish(commit)
        finally:
            self._guard.close()  # releases the writer lock
            self._release()

    def _finish(self, commit: bool) -> None:
        # Given up (an interrupt): a blob in the middle of its copy holds the lock, and is not
        # waited for. The partial file's name goes now (its space once the copy lets it go: put_blob).
        if not self._lock.acquire(blocking=commit):
            self._abandoned = True
            if (tmp := self._tmp) is not None:
                tmp.unlink(missing_ok=True)
            return
        try:
            # the same entries in another order are the same index.json (index_document sorts them)
            changed = index_document(self._index) != index_document(self._loaded_index or [])
            if commit and changed and self._out is None:
                try:
                    self._writer()  # only names changed: rewrite the archive with the new index.json
                except Exception:
                    if self._out is None:
                        raise  # nothing begun, nothing to remove
                    # else _broken says why, and the partial file goes below
            out, file, tmp = self._out, self._file, self._tmp
            self._out = self._file = self._tmp = None
        finally:
            self._lock.release()
        if out is None or file is None or tmp is None:
            return
        try:
            if not commit or self._broken is not None:
                with suppress(OSError):  # the partial file goes: closing it must not hide the error before
                    file.close()
                if commit:  # an earlier write failed past repair: what was copied is not kept
                    raise self._not_written()
                return
            with naming(self.path), file:
                try:
                    self._carry_over(out)
                except Exception as exc:  # an interrupt goes on as it is (the partial file goes below)
                    if self._broken is None:
                        self._broken = f"{error_message(exc)} (copying what the archive held)"
                    raise self._not_written() from exc
                for name, data in (
                    ("index.json", index_document(self._index, self._index_doc)),
                    ("oci-layout", LAYOUT_VERSION),
                ):
                    out.addfile(_member(name, len(data)), io.BytesIO(data))
                out.close()
                file.sync()
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _not_written(self) -> ModelcarError:
        return ModelcarError(f"{self}: not written: {self._broken}")

    def tags_for(self, model: str, tags: list[str]) -> list[str]:
        return [model]  # as in a layout: one index.json entry per model, named by its ref name

    def _blob_name(self, digest: str) -> str:
        return f"blobs/sha256/{blob_hex(digest)}"

    def has_blob(self, repo: str, digest: str, size: int | None = None) -> bool:
        # what the archive held is carried into the new one as it is: `size` is not checked here
        return self._holds(self._blob_name(digest))

    def _holds(self, name: str) -> bool:
        return name in self._written or (not self.rewrite and name in self._members)

    def put_blob(self, repo: str, size: int, source: BlobSource, digest: str | None = None) -> str:
        if digest is None:
            raise ModelcarError(f"{self}: an archive takes blobs of known digest: build into oci:DIR, then mirror")
        name = self._blob_name(digest)
        with self._lock:
            try:
                return self._put_blob(name, size, source, digest)
            finally:
                if self._abandoned and self._file is not None:  # given up while this blob was copied
                    with suppress(OSError):
                        self._file.close()
                    self._out = self._file = self._tmp = None

    def _put_blob(self, name: str, size: int, source: BlobSource, digest: str) -> str:
        """put_blob's copy, under the lock."""
        if self._abandoned:
            raise ModelcarError(f"{self}: not written: given up (interrupted)")
        if self._broken is not None:
            raise self._not_written()
        if self._holds(name):
            return digest  # carried over into any new archive, or the archive stays as it is
        out = self._writer()
        start, members = out.offset, len(out.getmembers())
        reader = ChunkReader(source_errors(source()))
        try:
            try:
                with naming(self.path):
                    out.addfile(_member(name, size), reader)
            except OSError as exc:
                if str(exc) != "unexpected end of data":  # tarfile's word for a short source
                    raise
                raise IntegrityError(
                    f"{self}: blob {digest}: the source ended after {reader.count} of {size} bytes"
                ) from exc
            if reader.count != size or reader.digest != digest:
                raise DigestMismatch(f"{self}: blob {digest}: the source gave {reader.digest} ({reader.count} bytes)")
        except BaseException as failure:
            # The archive ends where this member began again: the blob may be put once more (a
            # copy retries a transfer that failed midway), and nothing of it is left in the tar.
            self._cut_back(start, members, f"blob {digest}", failure)
            raise  # what went wrong with this blob, whether or not the archive can go on
        self._written.add(name)
        return digest

    def _cut_back(self, offset: int, members: int, what: str, failure: BaseException) -> None:
        """End the tar being written at `offset`, after its first `members` members (under the lock)."""
        if self._out is None or self._file is None or self._broken is not None:
            return
        try:
            with naming(self.path):  # a full disk fails the rewind's flush too: say where
                self._file.rewind(offset)
        except OSError as exc:  # the member cannot be cut off: no later write may follow it
            # said by every later put and by close: whichever a caller reports names the cause
            self._broken = f"{os_error_message(exc)} (cutting off {what}, which failed: {error_message(failure)})"
        else:
            self._out.offset = offset
            del self._out.getmembers()[members:]  # the list itself, in write mode

    @contextmanager
    def all_or_nothing(self) -> Generator[None]:
        """An image's copy that fails takes its blobs with it: the tar is cut back to where the copy
        began (images are copied one after another; a blob another image holds was written before)."""
        with self._lock:
            out = self._out
            mark = (out.offset, len(out.getmembers())) if out is not None else (0, 0)
            written, put = set(self._written), dict(self._put)
        try:
            yield
        except Exception as failure:  # not an interrupt: the whole archive is given up then
            with self._lock:
                self._cut_back(*mark, "an image's blobs", failure)
                self._written, self._put = written, put
            raise

    def _pread(self, size: int, offset: int) -> bytes:
        # reads side by side, but none while close() lets the descriptor go (its number may be
        # reused at once: a read then would read another file)
        with self._reading:
            if self._source is None:
                raise ModelcarError(f"{self}: closed")
            source = self._source
            self._readers += 1
        try:
            return os.pread(source, size, offset)
        finally:
            with self._reading:
                self._readers -= 1
                self._reading.notify_all()

    def _read(self, member: tarfile.TarInfo) -> Iterator[bytes]:
        offset, end = member.offset_data, member.offset_data + member.size
        while offset < end:
            chunk = self._pread(min(PIECE, end - offset), offset)
            if not chunk:
                raise ModelcarError(f"{self}: {member.name} is truncated")
            offset += len(chunk)
            yield chunk

    def open_blob(self, repo: str, digest: str) -> Iterator[bytes]:
        return self._read(self._blob_member(digest))

    def blob_head(self, repo: str, digest: str, size: int) -> bytes:
        member = self._blob_member(digest)
        return self._pread(min(size, member.size), member.offset_data)

    def _manifest(self, digest: str) -> bytes:
        if (data := self._put.get(digest)) is not None:
            return data
        member = self._blob_member(digest)
        if member.size > MANIFEST_MAX:
            raise ModelcarError(f"{self}: {member.name}: larger than {MANIFEST_MAX} bytes: not a manifest")
        return b"".join(self._read(member))

    def _blob_member(self, digest: str) -> tarfile.TarInfo:
        member = self._members.get(self._blob_name(digest))
        if member is None:
            raise BlobNotFound(f"{self}: blob {digest} not found")
        return member

    def put_manifest(self, repo: str, data: bytes, media_type: str, ref: str | None = None) -> str:
        digest = self.put_blob(repo, len(data), lambda: [data], digest_of(data))
        self._put[digest] = data  # read back from here: the archive being written is not read
        if ref is not None:
            with self._lock:
                self._index = with_ref(self._index, ref, data, media_type)
        return digest

    def named_digest(self, repo: str, ref: str) -> str | None:
        if ref.startswith("sha256:"):
            return ref if self.has_blob(repo, ref) else None
        return next((str(entry["digest"]) for entry in self._index if ref_name(entry) == ref), None)

    def get_manifest(self, repo: str, ref: str) -> bytes:
        if ref.startswith("sha256:"):
            return self._manifest(ref)
        if (digest := self.named_digest(repo, ref)) is not None:
            return self._manifest(digest)
        names = sorted(ref_name(m) or "" for m in self._index)
        raise ModelcarError(f"{self}: no image named {ref!r} (it has: {', '.join(names) or 'none'})")
