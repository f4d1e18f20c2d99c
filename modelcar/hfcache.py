"""Write a Hugging Face cache from modelcar images, for servers that load by repo id offline.

`HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR` makes huggingface_hub (and vLLM, transformers) look only in
DIR: `models--ORG--NAME/blobs/<sha256>`, `snapshots/<commit>/<path>` symlinks into blobs, and
`refs/<revision>` naming the commit. Files come out of the image's layers, streamed and checked
against the lock's sha256 on the way; a blob lands under its final name only once verified, and
the snapshot's links are made once every file's blob is, in a directory renamed into place when
all are (a run that fails or is killed leaves no snapshot that huggingface_hub would take as the
commit's).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from modelcar.catalog import COMMIT_RE, Catalog
from modelcar.checked import is_stamped, stamp
from modelcar.errors import InputError, IntegrityError, ModelcarError, NotBuilt, PartialFailure
from modelcar.fsutil import (
    PIECE,
    ChunkReader,
    create_beside,
    file_writer,
    link_below,
    naming,
    replace_symlink,
    sha256_file,
    sweep_stale,
    write_if_changed,
)
from modelcar.hub import repo_folder
from modelcar.image import ANN_FILE_PATH, ANN_FILE_SHA256, MEDIA_LAYER, Descriptor
from modelcar.locate import Registries, locate
from modelcar.lock import LockedFile, LockedModel, read_lock
from modelcar.stores import Store, read_blob, read_image
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry_client import RegistryOptions
from modelcar.stores.spec import HF_CACHE
from modelcar.tarlayer import read_files

log = logging.getLogger("modelcar")


def write_hf_cache(store: Store, repo: str, entry: LockedModel, cache_dir: Path) -> Path:
    """Unpack one model's image into `cache_dir`; return its snapshot directory."""
    kind, _, repo_id = entry.source.partition("://")
    if kind != "hf":
        raise ModelcarError(f"{entry.source}: only Hub models (hf:) have a repo id to cache under")
    if entry.image is None or entry.image.digest is None:
        raise NotBuilt(f"{repo_id}: the lock has no image digest: run `modelcar build` first")
    root = cache_dir / repo_folder(repo_id)
    blobs = root / "blobs"
    snapshot = root / "snapshots" / entry.commit
    made: set[Path] = set()

    def directory(path: Path) -> Path:
        if path not in made:
            _no_link_between(cache_dir, path)
            path.mkdir(parents=True, exist_ok=True)
            made.add(path)
        return path

    directory(blobs)
    sweep_stale(blobs, ".*.incoming")  # left by a killed run
    expected = {f.path: f for f in entry.files}
    written: dict[str, Path] = {}  # each file's blob, checked: linked into the snapshot once all are
    image = read_image(store, repo, entry.image.digest)
    for layer in image.layers():
        if layer.media_type != MEDIA_LAYER:
            continue
        if (cached := _cached_file(layer, expected, blobs)) is not None:
            written[cached[0]] = cached[1]
            continue
        reader = ChunkReader(read_blob(store, repo, layer))
        for path, size, f in read_files(reader):
            locked = expected.get(path)
            if locked is None:
                raise IntegrityError(f"{repo_id}: the image has {path}, which the lock does not list")
            target = blobs / locked.sha256
            if _intact(target, size, locked.sha256):
                while f.read(PIECE):  # already cached: skip its bytes in the stream
                    pass
            else:
                _write_blob(f, target, size, locked.sha256, f"{repo_id}: {path}")
            written[path] = target
        reader.drain()
        if reader.digest != layer.digest:
            raise IntegrityError(f"{repo_id}: layer {layer.digest} has digest {reader.digest} in {store}")
    missing = sorted(set(expected) - set(written))
    if missing:
        raise IntegrityError(f"{repo_id}: the image lacks {', '.join(missing)}")
    # Linked only now: huggingface_hub offline takes a commit's snapshot directory, once there, for
    # the whole commit; made while the image streamed, a run that failed (a bad layer, a full
    # disk, a kill) left one without the weights, which vLLM then loaded.
    snapshots = directory(snapshot.parent)
    _sweep_staging(snapshots)
    _no_link_between(cache_dir, snapshot)  # a link there, even one leading nowhere, is not written through
    if snapshot.exists():  # another run's or huggingface_hub's: completed in place
        _link(snapshot, written, directory, snapshot)
    else:  # made whole beside it and renamed in: a run killed while linking leaves no snapshot either
        staging = snapshots / f".{entry.commit}.{secrets.token_hex(6)}{STAGING}"
        try:
            _link(staging, written, directory, snapshot)
            try:
                os.rename(staging, snapshot)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                _link(snapshot, written, directory, snapshot)  # another run's came first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if entry.revision and not COMMIT_RE.fullmatch(entry.revision):
        ref = root / "refs" / entry.revision
        write_if_changed(directory(ref.parent) / ref.name, entry.commit.encode())
    return snapshot


STAGING = ".staging"  # a snapshot being linked, beside where it goes
STAGING_STALE = 3600.0  # seconds after which one is a killed run's: linking takes milliseconds


def _link(into: Path, written: dict[str, Path], directory: Callable[[Path], Path], snapshot: Path) -> None:
    """Link each file in `into` (the snapshot, or its staging directory) to its blob: relative, so
    the cache can move, and a staging directory is as deep as the snapshot, so they hold once it is
    renamed. An error is said of the snapshot's file (a full disk), not of a link's target or temp name."""
    for path, target in written.items():
        link = directory((into / path).parent) / PurePosixPath(path).name
        try:
            replace_symlink(link, os.path.relpath(target, link.parent))
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(snapshot / path)) from None


def _sweep_staging(snapshots: Path) -> None:
    """Remove the staging directories of runs killed while linking (hidden, and no snapshot to
    huggingface_hub, but each a tree of links)."""
    for staged in snapshots.glob(f".*{STAGING}"):
        with suppress(OSError):
            st = staged.lstat()
            if stat.S_ISDIR(st.st_mode) and time.time() - st.st_mtime > STAGING_STALE:
                shutil.rmtree(staged)


def _no_link_between(top: Path, path: Path) -> None:
    """Refuse to write under a directory of the cache that is a symbolic link: a snapshot or blobs
    directory someone pointed elsewhere took the files written there with it (the cache's own
    directory, `top`, may be a link: its owner chose where it is)."""
    if (link := link_below(top, path)) is not None:
        raise IntegrityError(
            f"{link}: a symbolic link in the Hugging Face cache, where a directory belongs: not written "
            "through (it leads out of the cache); remove it"
        )


def _cached_file(layer: Descriptor, expected: dict[str, LockedFile], blobs: Path) -> tuple[str, Path] | None:
    """The file of a one-file layer, where the cache holds its blob whole already: (its path, the
    blob). The layer is then not read: a mirror run again over the same cache read every layer
    (from a registry: downloaded it) to throw its bytes away. Its annotations only say which file
    it is; what the snapshot links to is the cache's blob, checked against the lock."""
    path = layer.annotations.get(ANN_FILE_PATH)
    locked = expected.get(path) if path is not None else None
    if path is None or locked is None or layer.annotations.get(ANN_FILE_SHA256) != locked.sha256:
        return None
    target = blobs / locked.sha256
    return (path, target) if _intact(target, locked.size, locked.sha256) else None


def _intact(blob: Path, size: int, sha256: str) -> bool:
    """The cache holds this blob whole: stamped as checked (checked.py), or hashed now and stamped.
    A mirror run again over the same cache then hashes no blob again (nor reads its layer: _cached_file)."""
    try:
        before = blob.stat()
    except FileNotFoundError:
        return False
    if before.st_size != size:
        return False
    if is_stamped(blob, sha256):
        return True
    if sha256_file(blob) != sha256:
        return False
    stamp(blob, sha256, before)
    return True


def _write_blob(f: IO[bytes], target: Path, size: int, sha256: str, what: str) -> None:
    fd, tmp = create_beside(target, ".incoming")
    try:
        h = hashlib.sha256()
        out = file_writer(fd, target.parent, size)
        try:
            while chunk := f.read(PIECE):  # the image's stream: its errors are its own
                h.update(chunk)
                with naming(target):
                    out.write(chunk)
            with naming(target):
                out.sync()  # on disk before its name (and its stamp) say it is complete, as a layout's blob
                out.close()
        finally:
            if not out.closed:
                with suppress(OSError):  # the temp file goes: the error to report is the one above
                    out.close()
        if h.hexdigest() != sha256:
            raise IntegrityError(f"{what}: sha256 {h.hexdigest()}, the lock has {sha256}")
        os.replace(tmp, target)
        stamp(target, sha256, target.stat())  # written and checked here, this moment
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Cached:
    """A model written into an HF cache: the image it came from (by digest, and the store that held
    it) and the snapshot directory a server loads it from by repo id."""

    name: str
    digest: str
    source: str
    snapshot: Path
    destination: str  # `hf-cache:DIR`, as `mirror --to` named it

    def to_json(self) -> dict[str, str]:
        """As a copy's (`to` where the model went), with the snapshot directory a server loads."""
        return {
            "name": self.name,
            "digest": self.digest,
            "from": self.source,
            "to": self.destination,
            "snapshot": str(self.snapshot),
        }


def mirror_to_hf_cache(
    catalog: Catalog,
    names: list[str] | None,
    cache_dir: Path,
    *,
    source: Store | None,
    layout: LayoutStore,
    options: RegistryOptions,
) -> list[Cached]:
    """Write each selected Hub model's files into an HF cache; what was written for each.

    A local `path:` model has no repo id to be cached under: named, it is an error; in a whole
    catalog it is passed over with a warning, and a catalog with nothing else is an error too
    (exit 0 having written nothing would read as done). A model that fails does not stop the
    others: PartialFailure at the end names each failure and carries what was written."""
    lock = read_lock(catalog.lock_file)
    out: list[Cached] = []
    selected = catalog.select(names)
    local = [spec.name for spec in selected if spec.hf is None]
    if local and (names or len(local) == len(selected)):
        raise InputError(
            f"{', '.join(local)}: a local `path` model has no Hub repo id to be cached under: "
            "mirror it to a registry or an OCI layout instead"
        )
    errors: dict[str, BaseException] = {}
    with Registries(options) as registries:
        for spec in selected:
            if spec.hf is None:
                log.warning("%s: a local `path` model has no Hub repo id: not written to the HF cache", spec.name)
                continue
            try:
                found = locate(catalog, lock, spec.name, source=source, layout=layout, registries=registries)
                snapshot = write_hf_cache(found.store, found.repo, found.entry, cache_dir)
                out.append(Cached(spec.name, found.digest, str(found.store), snapshot, f"{HF_CACHE}{cache_dir}"))
            except (ModelcarError, OSError) as exc:  # the others still go in
                errors[spec.name] = exc
                continue
            log.info("%s: %s -> hf-cache:%s", spec.name, found.digest, cache_dir)
    if errors:
        raise PartialFailure.of(errors, out)
    return out
