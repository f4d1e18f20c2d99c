"""Local models: a catalog's `path:` entries, listed and checked as a reader of the directory sees them.

A local model has no commit: its content id (over every file's path, size and sha256) stands in for
one, and its files are checked against the lock before each build, since nothing else pins them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from modelcar.catalog import Catalog, ModelSpec, select_files
from modelcar.checked import LocalNotes, Notes, read_checked
from modelcar.describe import plural
from modelcar.errors import CatalogError, InputError, IntegrityError, os_error_message
from modelcar.fsutil import sha256_file, tree_files
from modelcar.layercache import default_cache_dir
from modelcar.lock import LockedFile, LockedModel
from modelcar.retry import worker_pool
from modelcar.tarlayer import WHITEOUT_REASON, SourceChanged, is_whiteout

CHECKS = 4  # a local model's files hashed at once (sha256 lets go of the GIL)
log = logging.getLogger("modelcar")


def content_id(files: list[LockedFile]) -> str:
    """A 40-hex id for a local directory's content, standing in for a commit."""
    h = hashlib.sha1(usedforsecurity=False)
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()


def local_source_dir(catalog: Catalog, spec: ModelSpec) -> Path:
    assert spec.path is not None
    return (catalog.root / spec.path).resolve()


def _selected(catalog: Catalog, spec: ModelSpec) -> list[str]:
    """The files of a local model the catalog's selection takes now, by name (nothing is read)."""
    paths, _, _ = tree_files(local_source_dir(catalog, spec))
    return select_files(paths, spec.include, spec.exclude, key=str)


def files_not_locked(catalog: Catalog, spec: ModelSpec, entry: LockedModel) -> list[str]:
    """The files of a local model the catalog's selection takes and its lock entry does not list:
    added since `lock`."""
    return _not_locked(_selected(catalog, spec), entry)


def _not_locked(selected: Iterable[str], entry: LockedModel) -> list[str]:
    locked = {f.path for f in entry.files}
    return [rel for rel in selected if rel not in locked]


def local_files_moved(catalog: Catalog, spec: ModelSpec, entry: LockedModel) -> bool:
    """Whether a local model's locked files differ from its lock entry in what shows without
    reading them: one gone, or its size changed (`plan` reads no weights; an edit that keeps
    every size is found by the build, which checks the files against the lock). A file added
    since is not: the build leaves it out and says `lock --update` takes it in; listed for it,
    a model was built to no change in every plan after."""
    root = local_source_dir(catalog, spec)
    try:
        sizes = {rel: (root / rel).stat().st_size for rel in _selected(catalog, spec)}
    except OSError:
        return True  # the build says what is wrong
    _say_unlocked(catalog, spec, _not_locked(sorted(sizes), entry))
    return any(sizes.get(f.path) != f.size for f in entry.files)


def say_if_moved(catalog: Catalog, spec: ModelSpec, entry: LockedModel) -> None:
    """`lock` keeps a local model's pin (only `--update` pins its files anew): a file edited since,
    which `build` then refuses, is said at once, not as "unchanged"."""
    if local_files_moved(catalog, spec, entry):
        log.warning(
            "%s: files changed since the lock (one gone, or of another size); the pin stays: "
            "`modelcar lock --update %s` pins them (`build` refuses them until then)",
            catalog.label(spec),
            spec.name,
        )


def list_local(catalog: Catalog, spec: ModelSpec, notes: Notes | None = None) -> list[LockedFile]:
    """A local model's files as the lock has them, each noted as checked (the build that follows
    does not hash them again)."""
    root = local_source_dir(catalog, spec)
    if not root.is_dir():
        raise CatalogError(f"{catalog.label(spec)}: path: {root} is not a directory")
    if notes is None:
        with suppress(InputError):  # no home directory for modelcar's cache: nothing is noted
            notes = LocalNotes(default_cache_dir())
    try:
        paths, bad_entries, bad_dirs = tree_files(root)
    except OSError as exc:
        raise CatalogError(f"{catalog.label(spec)}: path: {os_error_message(exc)}") from None
    # what cannot be read is refused where the selection reaches it: a file it would take, a
    # directory that `exclude` does not leave out
    bad = [(rel, bad_entries[rel]) for rel in select_files(list(bad_entries), spec.include, spec.exclude, key=str)]
    bad += [(rel, why) for rel, why in bad_dirs.items() if select_files([rel + "/"], ["*"], spec.exclude, key=str)]

    def refuse(rel: str, why: str, remedy: str = "mend it") -> CatalogError:
        shown = os.fsencode(root / rel).decode("utf-8", "backslashreplace")  # bytes that are no UTF-8, as such
        return CatalogError(f"{catalog.label(spec)}: {shown}: {why}: {remedy}, or leave it out with `exclude`")

    for rel, why in sorted(bad)[:1]:
        raise refuse(rel, why)
    selected = select_files(paths, spec.include, spec.exclude, key=str)
    for rel in selected:  # before any file is hashed: a refused model's gigabytes are not read
        if is_whiteout(rel):
            raise refuse(rel, WHITEOUT_REASON, "rename it")
    files = []
    for rel in selected:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are no UTF-8, kept as surrogates
            raise refuse(rel, "the file name is not UTF-8", "rename it") from None
        try:
            before = (root / rel).stat()
            files.append(LockedFile(path=rel, size=before.st_size, sha256=sha256_file(root / rel)))
        except OSError as exc:
            raise refuse(rel, f"cannot be read ({exc.strerror})") from None
        if notes is not None:
            notes.remember(root / rel, files[-1].sha256, before)
    return files


def check_local(catalog: Catalog, spec: ModelSpec, entry: LockedModel, notes: Notes) -> dict[str, Path]:
    """A local model's files, checked against the lock before anything is built: a layer the store
    holds already (reused, or its digest remembered) is never read, so a file rewritten in place
    (retrained weights of the same size) would have shipped the old image. A file noted as
    checked and not changed since is not read again (checked.LocalNotes)."""
    root = local_source_dir(catalog, spec)
    out: dict[str, Path] = {}
    for f in entry.files:
        path = root / f.path
        size = path.stat().st_size if path.is_file() else -1
        if size != f.size:
            raise changed_local(catalog, spec, path, "missing" if size < 0 else f"{size} bytes", f"{f.size} bytes")
        out[f.path] = path

    def check(f: LockedFile) -> None:
        if notes.checked(out[f.path], f.sha256):
            return
        try:
            for _ in read_checked(out[f.path], f.member, notes=notes):
                pass
        except SourceChanged:
            raise changed_local(catalog, spec, out[f.path], "its content", f"sha256 {f.sha256}") from None

    with worker_pool(CHECKS) as pool:
        list(pool.map(check, entry.files))
    with suppress(OSError):  # what cannot be listed is no file the lock could have missed
        _say_unlocked(catalog, spec, files_not_locked(catalog, spec, entry))
    return out


def _say_unlocked(catalog: Catalog, spec: ModelSpec, added: list[str]) -> None:
    """The lock says what is built; a file put beside the model since is not in its image."""
    if added:
        log.warning(
            "%s: %s the lock does not list, not in the image (%s): `modelcar lock --update %s` takes %s in",
            catalog.label(spec),
            plural(len(added), "file"),
            ", ".join(added[:5]) + (", ..." if len(added) > 5 else ""),
            spec.name,
            "it" if len(added) == 1 else "them",
        )


class LocalChanged(IntegrityError, InputError):
    """A `path:` model's file is not what the lock pins: the files or the lock are to change (`lock
    --update`), and a run again gets the same answer (exit 2)."""


def changed_local(catalog: Catalog, spec: ModelSpec, path: Path, actual: str, expected: str) -> LocalChanged:
    return LocalChanged(
        f"{catalog.label(spec)}: {path}: {actual} does not match the lock ({expected}); "
        f"run `modelcar lock --update {spec.name}` if the change is intended"
    )
