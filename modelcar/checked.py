"""Files read and checked against the sha256 the lock has, in the pass that uses them.

A layer made from files needs two sha256 passes over every byte: the layer's digest and each
file's check against the lock. On 2 cores that second pass is a quarter of a layout build from
a warm HF cache (1 GiB: 1.55 s, 1.2 s without it). So a file of the HF cache that matched once
is stamped with an extended attribute (`user.modelcar.sha256`: its sha256, size and mtime) and
read without the check while its size and mtime are the stamp's, the stat-based trust of git's
index, Bazel's digest cache and rsync. Writing to a file moves its mtime unless the writer puts it
back on purpose (`rsync --inplace -t`, `touch -r`), and huggingface_hub never rewrites a blob: a
new download is a new file, with no stamp. (A write within one timestamp tick of the stat before a
read could go unseen, git's "racily clean" case; a blob written once before it is renamed into
place never meets it.) Bits that rot on disk under an unchanged mtime are seen only where a
layer's remembered digest fails (the build then checks every file, stamps or not), not by a layer
made anew: `hf cache verify` re-hashes a cache, `modelcar verify` an image.

Stamps go only on HF cache files (those a Hub model reads, those `mirror --to hf-cache:` writes),
never on a user's own model directory, and count only on a file that this user (or root) owns and
nobody else may write (mode without group or other write): in a shared cache another user could change a
file and its stamp together, so there every read is checked. Where the file system has no user
xattrs (tmpfs before Linux 6.6, some network file systems) or the cache is read-only, nothing is
stamped and every read is checked.

A `path:` model's files are the user's: their notes are kept in modelcar's cache instead
(LocalNotes), and hold the file's inode and ctime too. A local file is the one that gets
rewritten in place (a model retrained to the same sizes), and its check is what stops a rebuild
from reusing the layers of the old weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from modelcar.fsutil import NOTE_MODE, TEMPS, Chunk, atomic_write_bytes, private, read_private, stream_file, sweep_once
from modelcar.tarlayer import Member, SourceChanged

log = logging.getLogger("modelcar")

STAMP = "user.modelcar.sha256"


def _stamp(sha256: str, st: os.stat_result) -> bytes:
    return f"{sha256} {st.st_size} {st.st_mtime_ns}".encode()


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when anything writes to the file (ctime too: a write whose mtime is put back)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def is_stamped(path: Path, sha256: str) -> bool:
    """The file was checked against `sha256` and has not changed since, by its size and mtime."""
    try:
        st = os.stat(path)
        return private(st) and os.getxattr(path, STAMP) == _stamp(sha256, st)
    except (OSError, AttributeError):  # no stamp, no xattrs here, or not Linux
        return False


def stamp(path: Path, sha256: str, before: os.stat_result) -> None:
    """Record that the file matched `sha256` when read. `before` is its stat from before the read:
    a file that changed while it was read is not stamped."""
    try:
        if private(before) and identity(before) == identity(os.stat(path)):
            os.setxattr(path, STAMP, _stamp(sha256, before))
    except (OSError, AttributeError) as exc:
        log.debug("%s: not stamped as checked: %s", path, exc)


class Notes(Protocol):
    """Where it is remembered that a file matched a sha256."""

    def checked(self, path: Path, sha256: str) -> bool:
        """The file matched `sha256` and has not changed since."""
        ...

    def remember(self, path: Path, sha256: str, before: os.stat_result) -> None:
        """The file matched `sha256`; `before` is its stat from before it was read."""
        ...


class Stamps:
    """Notes on the files themselves, as extended attributes: for HF cache files (see above)."""

    def checked(self, path: Path, sha256: str) -> bool:
        return is_stamped(path, sha256)

    def remember(self, path: Path, sha256: str, before: os.stat_result) -> None:
        stamp(path, sha256, before)


class LocalNotes:
    """Notes on a user's own files, kept in modelcar's cache (`checked/`, one small file per
    path). Valid while the file's device, inode, size, mtime and ctime are the noted ones: ctime
    moves on every write, whatever mtime a writer puts back, and no user can set it (an xattr on
    the file could not hold it: writing one moves ctime). `cache_dir` None: notes in memory, for
    this run only (no cache to keep them in, or nothing kept there may be trusted: `build
    --no-cache`), so a file checked before the build is not hashed again when its layer is read."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.root = cache_dir / "checked" if cache_dir is not None else None
        # this run's notes, also where the cache takes none (not writable here): a file checked
        # before the build is not hashed again when its layer is read
        self._run: dict[str, str] = {}

    def _file(self, key: str) -> Path:
        assert self.root is not None
        return self.root / hashlib.sha256(os.fsencode(key)).hexdigest()

    def checked(self, path: Path, sha256: str) -> bool:
        try:
            key, want = os.path.abspath(path), _note(sha256, os.stat(path))
            if self._run.get(key) == want:
                return True
            return self.root is not None and read_private(self._file(key)) == want.encode()
        except OSError:
            return False

    def remember(self, path: Path, sha256: str, before: os.stat_result) -> None:
        try:
            if identity(before) != identity(os.stat(path)):
                return
            key, note = os.path.abspath(path), _note(sha256, before)
            self._run[key] = note
            if self.root is not None:
                sweep_once(self.root, TEMPS)
                atomic_write_bytes(self._file(key), note.encode(), mode=NOTE_MODE, sweep=False)
        except OSError as exc:
            log.debug("%s: not noted as checked: %s", path, exc)


def _note(sha256: str, st: os.stat_result) -> str:
    return f"{sha256} {' '.join(map(str, identity(st)))}\n"


def read_checked(path: Path, member: Member, *, notes: Notes | None = None) -> Iterator[Chunk]:
    """The file's bytes (stream_file's views), hashed on the way: SourceChanged after the last one
    if they are not the lock's. With `notes`, a file noted as checked is not hashed and a file
    that matched is noted."""
    if notes is not None and notes.checked(path, member.sha256):
        yield from stream_file(path)
        return
    before = os.stat(path)
    h = hashlib.sha256()
    for chunk in stream_file(path):
        h.update(chunk)
        yield chunk
    if h.hexdigest() != member.sha256:
        raise SourceChanged(f"{member.path}: sha256 {h.hexdigest()}, the lock has {member.sha256}", member, before)
    if notes is not None:
        notes.remember(path, member.sha256, before)
