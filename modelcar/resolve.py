"""Resolving the catalog into the lock: each entry pinned to a commit, its files listed (`modelcar lock`).

The Hub is asked only about what changed (or, with `update`, what can move), each question once per
run; the lock is written only when every selected entry resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from modelcar.catalog import Catalog, ModelSpec
from modelcar.errors import CatalogError, HubError, IntegrityError, ModelcarError, all_of, said_of
from modelcar.hub import Hub, LazyHub, RevisionNotFound
from modelcar.local import content_id, list_local, local_source_dir
from modelcar.lock import (
    Lock,
    LockedModel,
    Pinned,
    is_current,
    kept_image,
    pins_its_revision,
    read_lock,
    renamed_pins,
    same_pin,
    save_entries,
    source_of,
)
from modelcar.retry import worker_pool
from modelcar.tarlayer import EXCLUDE_WHITEOUTS, WHITEOUT_REASON, is_whiteout


def lock_one(
    catalog: Catalog,
    spec: ModelSpec,
    hub: Callable[[], Hub],
    pinned: str | None = None,
    current: LockedModel | None = None,
    earlier: LockedModel | None = None,
) -> LockedModel:
    """A lock entry for `spec`: at the commit its revision names now, or at `pinned` (the entry's
    own pin, kept while only its file selection changed). `current`: the entry as locked, for the
    same selection: where the revision still names its commit, its files are kept as they are (a
    commit's files never change), not listed and hashed again: `--update` of a catalog where
    one model moved asks the Hub one question per other model, not a tree listing each.
    `earlier`: the entry at another commit of the same repo, whose small files' sha256 the new
    commit's same files keep (Hub.list_files)."""
    label = catalog.label(spec)
    if spec.hf is not None:
        try:
            commit = pinned or hub().resolve(spec.hf, spec.hf_revision)
            if current is not None and current.commit == commit:
                return current.model_copy(update={"image": None})
            files = hub().list_files(spec.hf, commit, spec.include, spec.exclude, earlier)
        except RevisionNotFound as exc:
            if pinned is None:
                raise said_of(exc, label) from exc
            raise RevisionNotFound(
                f"{label}: the pinned commit {pinned} is not on the Hub any more (its history rewritten?): "
                f"`modelcar lock --update {spec.name}` pins what `revision: {spec.hf_revision}` names now"
            ) from exc
        except (HubError, IntegrityError) as exc:
            raise said_of(exc, label) from exc
        where = f"{spec.hf}@{commit[:12]}"
        for f in files:
            if is_whiteout(f.path):
                remedy = f"leave it out with `{EXCLUDE_WHITEOUTS}`"
                raise CatalogError(f"{label}: {where}: {f.path}: {WHITEOUT_REASON}: {remedy}")
    else:
        files = list_local(catalog, spec)
        commit = content_id(files)
        where = str(local_source_dir(catalog, spec))
    if not files:
        raise CatalogError(
            f"{label}: include: no file of {where} matches include {spec.include} "
            f"(exclude {spec.exclude}); widen `include` or check `exclude`"
        )
    return LockedModel(
        source=source_of(spec, catalog),
        revision=spec.hf_revision if spec.hf else None,
        commit=commit,
        include=sorted(set(spec.include)),
        exclude=sorted(set(spec.exclude)),
        files=files,
    )


LOCK_JOBS = 8  # catalog entries locked at once


@dataclass
class LockResult:
    lock: Lock
    locked: list[str] = field(default_factory=list)  # entries (re)resolved in this run
    changed: bool = False
    moved: list[str] = field(default_factory=list)  # of those, the new pins: another commit or files, or new


def lock_models(
    catalog: Catalog,
    names: list[str] | None = None,
    *,
    update: bool = False,
    hub: Callable[[], Hub] = Hub,
    write: bool = True,
) -> LockResult:
    """Pin the selected models: new or changed entries always, all of them with `update` but those
    whose catalog revision is the commit they pin (nothing can move: the Hub is not asked).

    The lock is written only when every selected model resolved: a failed run leaves the old
    lock as it was.
    """
    lock = read_lock(catalog.lock_file)
    lazy = LazyHub(hub)
    updates: dict[str, Pinned] = {}
    moved: list[str] = []
    renamed = {new: entry for new, (_, entry) in renamed_pins(catalog, lock).items()}
    with worker_pool(LOCK_JOBS, "lock") as pool:
        # Entries are asked about together (the Hub client bounds its requests in flight, and asks
        # each question once however many entries share a repo); results and errors come in
        # catalog order.
        asked: list[tuple[ModelSpec, LockedModel | None, Future[LockedModel] | None]] = []
        for spec in catalog.select(names):
            entry = lock.models.get(spec.name)
            source = source_of(spec, catalog)
            kept = (
                entry is not None
                and is_current(entry, spec, catalog)
                and (not update or pins_its_revision(entry, spec))
            )
            # Only the file selection (include, exclude) or the model's name changed: the pin stays, its
            # files listed again; the commit moves only with the revision, or with `update`.
            pin = entry or renamed.get(spec.name)
            pinned = (
                pin.commit
                if pin is not None
                and not update
                and spec.hf is not None
                and pin.source == source
                and pin.revision == spec.hf_revision
                else None
            )
            current = entry if entry is not None and is_current(entry, spec, catalog) else None
            earlier = entry if entry is not None and entry.source == source else None
            flight = None if kept else pool.submit(lock_one, catalog, spec, lazy, pinned, current, earlier)
            asked.append((spec, entry, flight))
        failures: list[ModelcarError] = []
        for spec, entry, flight in asked:
            if flight is None:
                assert entry is not None
                if (image := kept_image(entry.image, spec)) is not entry.image:  # not this model's image now
                    updates[spec.name] = Pinned(spec, entry.repinned(entry.model_copy(update={"image": image})))
                continue
            try:
                new = flight.result()
            except ModelcarError as exc:  # each model that cannot be pinned is named, not the first only
                failures.append(exc)
                continue
            if entry is not None and same_pin(entry, new):
                new.image = kept_image(entry.image, spec)
            else:
                moved.append(spec.name)
            if entry is not None and new.image is None:  # a new pin, or another base: its files' layers reused
                new = entry.repinned(new)
            updates[spec.name] = Pinned(spec, new)
    if failures:
        raise all_of(failures)
    if not write:
        lock.models.update({name: pin.apply(lock.models.get(name)) for name, pin in updates.items()})
        return LockResult(lock=lock, locked=list(updates), moved=moved)
    lock, changed = save_entries(catalog, updates)
    return LockResult(lock=lock, locked=list(updates), changed=changed, moved=moved)
