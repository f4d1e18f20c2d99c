"""lock -> hub -> image -> store: the work behind `modelcar build`.

Each model's files are fetched once (or read from a local model, checked), its layers streamed
into the store with what an earlier image or the layer cache already knows reused, and the image
it makes recorded in the lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcar.base import BaseImage, read_base
from modelcar.catalog import Catalog, ModelSpec
from modelcar.checked import LocalNotes, Notes, Stamps, read_checked
from modelcar.copy import check_blob_sizes, copy_blobs
from modelcar.describe import plural
from modelcar.errors import (
    DigestMismatch,
    InputError,
    IntegrityError,
    ModelcarError,
    PartialFailure,
    error_message,
    said_of,
)
from modelcar.fsutil import Chunk, atomic_write_bytes, stream_file
from modelcar.hub import Fetching, FileKey, Hub, LazyHub, download_key, hf_cache_dir, sweep_partial_downloads
from modelcar.image import (
    ANN_LAYER_KEY,
    LARGE_FILE,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_MANIFEST,
    BuiltImage,
    Descriptor,
    ImageMeta,
    LayerPlan,
    build_image,
    digest_of,
    plan_layers,
)
from modelcar.layercache import LayerCache
from modelcar.local import changed_local, check_local
from modelcar.lock import (
    Lock,
    LockedFile,
    LockedModel,
    Recorded,
    image_tags,
    read_lock,
    record_images,
)
from modelcar.progress import Progress
from modelcar.resolve import lock_models
from modelcar.retry import worker_pool
from modelcar.stores import LOOKUPS, Store, StoredImage, read_image
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry_client import RegistryOptions
from modelcar.tarlayer import Member, SourceChanged, TarParams, iter_layer

log = logging.getLogger("modelcar")


@dataclass
class LayerResult:
    plan: LayerPlan
    digest: str | None = None
    reused: bool = False  # the store held it before this build

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.plan.size, "files": [m.path for m in self.plan.members]}
        if self.digest:
            out["digest"] = self.digest
        return out


@dataclass
class ModelResult:
    name: str
    source: str
    commit: str
    files: int
    layers: list[LayerResult]
    digest: str | None = None
    entry: LockedModel | None = None  # the lock entry this build produced
    reused: int = 0  # layers the store already held: not read, not uploaded
    seconds: float = 0.0
    error: str | None = None
    reference: str | None = None  # where the image is now, as `modelcar inspect` reads it (a registry's: any client)

    @property
    def bytes(self) -> int:
        return sum(layer.plan.size for layer in self.layers)

    @property
    def written_bytes(self) -> int:
        """Bytes of the layers this build put into the store: not those it held already, nor those
        a failed build (or a dry run) never got to."""
        return sum(layer.plan.size for layer in self.layers if layer.digest is not None and not layer.reused)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "commit": self.commit,
            "digest": self.digest,
            "reference": self.reference,
            "files": self.files,
            "bytes": self.bytes,
            "layers": [layer.to_json() for layer in self.layers],
            "layersReused": self.reused,
            "bytesWritten": self.written_bytes,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


def _default_layout(catalog: Catalog) -> Path:
    """The layout beside the catalog, in a directory that tells git to leave it out: it holds whole
    weights, and the catalog usually sits in a GitOps checkout where `git add -A` is a habit."""
    ignore = catalog.default_layout.parent / ".gitignore"
    if not ignore.exists():
        ignore.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ignore, b"# modelcar's build output: images with whole weights, not for git\n*\n")
    return catalog.default_layout


def _sweep_hf_cache(specs: list[ModelSpec], cache_dir: Path | None) -> None:
    """What killed downloads left in the HF cache (`cache_dir`, or the environment's) for these
    models' repos: also when this run downloads nothing (a no-op build). Where there is no cache to
    find (no home directory), there is nothing to sweep: a build that needs to download says so."""
    try:
        cache_dir = cache_dir or hf_cache_dir()
    except InputError:
        return
    for repo in sorted({s.hf for s in specs if s.hf is not None}):
        sweep_partial_downloads(cache_dir, repo)


def build_models(
    catalog: Catalog,
    names: list[str] | None = None,
    *,
    store: Store | None = None,
    layout: Path | None = None,
    jobs: int = 4,
    dry_run: bool = False,
    hub: Callable[[], Hub] = Hub,
    params: TarParams | None = None,
    large_file: int = LARGE_FILE,
    progress: Progress | None = None,
    cache: LayerCache | None = None,
    registry_options: RegistryOptions | None = None,
    update_lock: bool = True,
    update: bool = False,
    no_cache: bool = False,
    hf_cache: Path | None = None,
) -> list[ModelResult]:
    """Lock what needs it, download each snapshot once, and write each image into the store.

    The store is the local OCI layout unless another is given (a registry, for `--push`). With
    `update`, pinned models are resolved again first (`lock --update` and the build in one run:
    a new commit on the tracked branch is built at once). With `update_lock=False` (a CI worker
    writing a partial result) the lock file is left as it is; each result's `entry` is what the
    lock would have received.

    With `no_cache` nothing remembered is trusted: no layer of an earlier image is reused, no
    layer digest is taken from the cache, no file's check from a stamp or note. Every file is read
    and checked, every layer made anew: what a damaged image (`modelcar verify` fails) is rebuilt
    with; the store gets each blob afresh (a layout's damaged copy is replaced) and the layer
    cache is written anew.
    """
    params = params or TarParams.from_env()
    progress = progress or Progress(enabled=False)
    cache = cache or LayerCache()
    # Local files' notes and HF cache files' stamps. Local files are checked before every build
    # whatever happens to their layers (reused from an earlier image, or made by another model of
    # this run with the same file): with no cache directory, or under --no-cache, the notes are
    # this run's only; HF cache files are then checked as their layers are read.
    notes: tuple[Notes, Notes | None] = (LocalNotes(cache.base), Stamps())
    if no_cache:
        notes = (LocalNotes(None), None)
        if cache.base is not None:
            cache = LayerCache(cache.base, trusted=False)
    lazy = LazyHub(hub)
    specs = catalog.select(names)
    if not dry_run:
        _sweep_hf_cache(specs, hf_cache)  # the cache `hub` downloads into, when not the environment's
    store = None if dry_run else store or LayoutStore(layout or _default_layout(catalog))
    if no_cache and isinstance(store, LayoutStore):  # what the layout holds is written again
        store = LayoutStore(store.root, rewrite=True)
    with worker_pool(1, "earlier-images") as side:
        # The images built last time (their layers may be reused) are looked up while the Hub is
        # asked for the new commit: neither waits for the other's round trips.
        earlier = (
            side.submit(earlier_images, store, specs, read_lock(catalog.lock_file))
            if store is not None and not no_cache
            else None
        )
        locked = lock_models(catalog, names, update=update, hub=lazy, write=update_lock and not dry_run)
        lock = locked.lock
        results = [
            ModelResult(
                name=s.name,
                source=lock.models[s.name].source,
                commit=lock.models[s.name].commit,
                files=len(lock.models[s.name].files),
                layers=[LayerResult(p) for p in plan_layers(lock.models[s.name].members, params, large_file)],
            )
            for s in specs
        ]
        if store is None:
            return results
        found = earlier.result() if earlier is not None else {s.name: Earlier() for s in specs}

    errors: dict[str, BaseException] = {}
    recorded: dict[str, Recorded] = {}  # what the lock gets of each image built
    named: dict[str, dict[str, str]] = {}  # model -> what the store names already (reuse_layers)
    for spec, result in zip(specs, results, strict=True):
        try:  # a layer over the registry's limit, a repository it refuses: that model's failure
            check_blob_sizes(store, [(layer.plan.description, layer.plan.size) for layer in result.layers], spec.name)
            named[spec.name] = reuse_layers(store, store.image_name(spec.name), result.layers, cache, found[spec.name])
        except (ModelcarError, OSError) as exc:
            result.error = error_message(exc)
            errors[spec.name] = exc

    # Download: each repo@commit once, whatever number of entries use it, and only the files of
    # layers the store does not hold yet; each layer is built as soon as its files are in.
    wanted = [
        (s.hf, lock.models[s.name].commit, f)
        for s, result in zip(specs, results, strict=True)
        if s.hf is not None and s.name not in errors
        for layer in result.layers
        if layer.digest is None
        for f in _layer_files(lock.models[s.name], layer)
    ]
    bases: dict[str, BaseImage] = {}
    download_total = sum({download_key(r, c, f): f.size for r, c, f in wanted}.values())
    build_total = sum(r.bytes for r in results if r.name not in errors)
    fetching = None
    try:
        if wanted:  # a ^C from here on stops the downloads' retries (Fetching, when it is cut short)
            fetching = lazy().start_fetch(wanted, on_file=lambda f: progress.advance("download", f.size))
        with progress.bar("download", download_total, "download"), progress.bar("build", build_total, "build"):
            for spec, result in zip(specs, results, strict=True):
                if spec.name in errors:
                    continue
                entry = lock.models[spec.name]
                started = time.monotonic()
                try:
                    if spec.base and spec.base not in bases:
                        try:
                            bases[spec.base] = read_base(spec.base, registry_options or RegistryOptions.create())
                        except ModelcarError as exc:  # the entry and field to look at, with what the store said
                            raise said_of(exc, f"{catalog.label(spec)}: base") from exc
                    result.digest = write_image(
                        store,
                        spec.name,
                        entry,
                        result.layers,
                        _file_source(catalog, spec, entry, fetching, lazy, notes),
                        params,
                        jobs=jobs,
                        progress=progress,
                        tags=image_tags(spec, entry),
                        cache=cache,
                        base=bases[spec.base].only(spec.platforms) if spec.base else None,
                        platforms=spec.platforms,
                        named=named.get(spec.name),
                    )
                except (ModelcarError, OSError) as exc:  # OSError: the layout's disk is full, a cache file went
                    result.error = error_message(exc)
                    errors[spec.name] = exc
                    continue
                repository = store.repository(spec.name)  # a registry's; a layout names images by model only
                recorded[spec.name] = Recorded(spec, entry, result.digest, repository, built=True)
                entry.image = recorded[spec.name].image_for(entry)
                result.seconds = time.monotonic() - started
                result.reused = sum(layer.reused for layer in result.layers)
                result.reference = store.reference(store.image_name(spec.name), result.digest)
                log.info(
                    "%s: %s: %s (%d written, %d already there), %d bytes, %.1f s -> %s%s",
                    spec.name,
                    result.digest,
                    plural(len(result.layers), "layer"),
                    len(result.layers) - result.reused,
                    result.reused,
                    result.bytes,
                    result.seconds,
                    result.reference,
                    f" (tags: {', '.join(image_tags(spec, entry))})" if repository else "",
                )
    except BaseException as exc:
        if fetching is not None:
            fetching.close(interrupted=isinstance(exc, (KeyboardInterrupt, SystemExit)))
        raise
    finally:
        for based in bases.values():  # an archive's descriptor, a registry's connections
            based.store.close(commit=False)
    if fetching is not None:
        fetching.close()
    for r in results:
        r.entry = lock.models[r.name]
    unrecorded: dict[str, str] = {}
    if update_lock and recorded:
        unrecorded = record_images(catalog, recorded, "written", "build again (nothing is built twice)")
    if errors or unrecorded:
        raise BuildFailed.of(errors, results, *dict.fromkeys(unrecorded.values()))
    return results


class BuildFailed(PartialFailure[ModelResult]):
    """Some models failed; `results` has them all (the others were built and recorded)."""


@dataclass(frozen=True)
class FileSource:
    """Where a model's files are on disk, and how to replace one whose bytes were found bad.
    `notes`: where a file's check is remembered (checked.py)."""

    path: Callable[[str], Path]
    replace: Callable[[str, os.stat_result | None], Path]  # a file's name, and the copy found bad where known
    notes: Notes | None = None

    @classmethod
    def fixed(cls, path: Callable[[str], Path]) -> FileSource:
        """Files that cannot be fetched again: bad bytes are an error."""

        def replace(name: str, seen: os.stat_result | None) -> Path:
            raise IntegrityError(f"{path(name)}: its bytes do not match the lock")

        return cls(path, replace)


def _file_source(
    catalog: Catalog,
    spec: ModelSpec,
    entry: LockedModel,
    fetching: Fetching | None,
    hub: Callable[[], Hub],
    notes: tuple[Notes, Notes | None],
) -> FileSource:
    """A Hub model's files come from the downloads in flight (waited for when a layer needs
    them), a bad one is fetched again once; a local model's files are what they are. `notes`:
    where the checks of local files and of HF cache files are remembered (None: HF cache files are
    checked each time their layer is read)."""
    local_notes, hf_notes = notes
    if spec.hf is None:
        local = check_local(catalog, spec, entry, local_notes)
        locked = {f.path: f for f in entry.files}

        def bad_local(path: str, seen: os.stat_result | None) -> Path:
            raise changed_local(catalog, spec, local[path], "its content", f"sha256 {locked[path].sha256}")

        return FileSource(local.__getitem__, bad_local, notes=local_notes)
    repo_id, commit = spec.hf, entry.commit
    by_path = {f.path: f for f in entry.files}

    def path(name: str) -> Path:
        if fetching is None:
            raise ModelcarError(f"{repo_id}: {name}: not downloaded")
        return fetching.path(FileKey(repo_id, commit, name))

    return FileSource(path, lambda name, seen: hub().refetch(repo_id, commit, by_path[name], seen), notes=hf_notes)


def _layer_files(entry: LockedModel, layer: LayerResult) -> list[LockedFile]:
    by_path = {f.path: f for f in entry.files}
    return [by_path[m.path] for m in layer.plan.members]


@dataclass
class Earlier:
    """A model's images an earlier build left in the store: under the model's own name (reference
    -> image), and elsewhere in the same registry (the lock's repository, under a prefix the
    catalog has since moved from), whose blobs are mounted instead of sent again. `pinned`: the
    digests the lock records, the images whose layers' annotations are taken (see earlier_images)."""

    named: dict[str, StoredImage] = field(default_factory=dict)
    elsewhere: list[StoredImage] = field(default_factory=list)
    pinned: set[str] = field(default_factory=set)

    def vouched(self) -> list[StoredImage]:
        """The images the lock names by digest: what their layers' annotations claim is what this
        tool built (a manifest read by digest is checked against it)."""
        return [image for image in [*self.named.values(), *self.elsewhere] if image.digest in self.pinned]


def earlier_images(store: Store, specs: Sequence[ModelSpec], lock: Lock) -> dict[str, Earlier]:
    """The images of each model the store holds under the names an earlier build left (the lock's
    digest, or the one of the commit its pin replaced; the commit's and the catalog's tags), and
    the one the lock records in another repository of the same registry. The layers' annotations
    of those the lock names by digest let a new commit reuse the layer of every file it did not
    change, and a moved prefix mount every layer it holds. A tag names what anyone who can push
    there put there: an image found by one only says which of the names are already in place.

    The lookups are round trips to a registry, each independent of the others: they run side by
    side, so a rebuild waits for about two of them, not for twenty. The blobs of an image the store
    serves are in the store: they are not asked about again.
    """
    wanted: list[tuple[str, str, str]] = []  # model, repo, reference
    found = {spec.name: Earlier() for spec in specs}
    for spec in specs:
        old = lock.models.get(spec.name)
        repo = store.image_name(spec.name)
        recorded = old.reusable if old else []
        refs = [str(r.digest) for r in recorded]
        found[spec.name].pinned.update(refs)
        refs += store.tags_for(spec.name, [*([old.commit[:12]] if old else []), *spec.tags])
        wanted += [(spec.name, repo, ref) for ref in dict.fromkeys(refs)]
        for r in recorded:
            there = store.repo_of(r.repository) if r.repository else None
            if there not in (None, repo):
                # pushed under another prefix of this registry: its layers are mounted from there
                wanted.append((spec.name, str(there), str(r.digest)))

    def read(item: tuple[str, str, str]) -> StoredImage | None:
        _, repo, ref = item
        try:
            # a tag by a HEAD: the lock's digest and the tags mostly name one image, read once
            digest = ref if ref.startswith("sha256:") else store.named_digest(repo, ref)
            if digest is None:
                return None
            image = read_image(store, repo, digest)
        except ModelcarError as exc:
            log.debug("%s: earlier image %s not usable: %s", repo, ref, exc)
            return None
        store.known_in(image.blobs(), store, repo)
        return image

    with worker_pool(LOOKUPS) as pool:
        for (model, repo, ref), image in zip(wanted, pool.map(read, wanted), strict=True):
            if image is None:
                continue
            if repo == store.image_name(model):
                found[model].named[ref] = image
            else:
                found[model].elsewhere.append(image)
    return found


def reuse_layers(
    store: Store, repo: str, layers: list[LayerResult], cache: LayerCache, earlier: Earlier
) -> dict[str, str]:
    """Give a digest to each layer the store already holds, so its files are neither downloaded
    nor read. Digests come from the layer cache, which first learns the layers of the model's
    earlier images (`earlier_images`: their layer-key annotations): a new commit that changes one
    file makes only that file's layer. Returns what the earlier images' references name (see
    `write_image`'s `named`).
    """

    def held(layer: LayerResult) -> str | None:
        known = cache.digest(layer.plan.annotations[ANN_LAYER_KEY], layer.plan.size)
        if known is None:
            return None
        return known if store.has_blob(repo, known, layer.plan.size) or store.mount_blob(repo, known) else None

    for image in earlier.vouched():
        cache.learn(image.layers())
    with worker_pool(LOOKUPS) as pool:
        digests = list(pool.map(held, layers))
    for layer, digest in zip(layers, digests, strict=True):
        if digest is not None:
            layer.digest = digest
            layer.reused = True
    return {ref: image.digest for ref, image in earlier.named.items()}


def write_image(
    store: Store,
    model: str,
    entry: LockedModel,
    layers: list[LayerResult],
    files: FileSource,
    params: TarParams,
    *,
    jobs: int = 4,
    progress: Progress | None = None,
    tags: list[str] | None = None,
    cache: LayerCache | None = None,
    base: BaseImage | None = None,
    platforms: Sequence[str] | None = None,
    named: Mapping[str, str] | None = None,
) -> str:
    """Stream every layer into the store (`jobs` at a time), then the configs, manifests and index.

    Layers that already have a digest (reuse_layers) are not read at all. The index goes last: a
    store never names an image whose blobs it does not hold. `named` (from reuse_layers) is what
    the store names already, reference -> digest: an image it holds is not put again, nor a tag
    that names it already.

    When every large layer's digest is known before it is written (a rebuild, a new commit that
    changed small files), the small layers are hashed first, so each goes up in one request with
    its digest, and the configs go up beside them: against a far registry the new blobs cost two
    or three round trips instead of six.
    """
    named = named or {}
    progress = progress or Progress(enabled=False)
    repo = store.image_name(model)

    def known(layer: LayerResult) -> str | None:
        """The digest a layer will have, known before it is written: it is reused, or the layer
        cache remembers it (made from bytes checked against the lock, or stamped as checked: see
        checked.py; the store checks the stream against it)."""
        if layer.digest is not None or cache is None:
            return layer.digest
        return cache.digest(layer.plan.annotations[ANN_LAYER_KEY], layer.plan.size)

    def paths_of(layer: LayerResult) -> dict[str, Path]:
        return {m.path: files.path(m.path) for m in layer.plan.members}  # waits for downloads in flight

    def layer_bytes(
        layer: LayerResult, paths: Mapping[str, Path], *, check: bool, notes: Notes | None = files.notes
    ) -> Iterator[Chunk]:
        """The layer's stream, with each file checked against the lock (`check`) in the same pass;
        with `notes`, but for the files noted as checked already (checked.py)."""

        def read(member: Member) -> Iterator[Chunk]:
            path = paths[member.path]
            return read_checked(path, member, notes=notes) if check else stream_file(path)

        return iter_layer(layer.plan.entries, read)

    def hashed(layer: LayerResult) -> str | None:
        """A small layer's digest, from its files checked against the lock (or stamped as checked):
        a second read of them costs less than a round trip. None for a file found bad (write_layer
        replaces it)."""
        digest = hashlib.sha256()
        try:
            for chunk in layer_bytes(layer, paths_of(layer), check=True):
                digest.update(chunk)
        except SourceChanged:
            return None
        return "sha256:" + digest.hexdigest()

    def write_layer(layer: LayerResult, digest: str | None) -> Descriptor:
        size = layer.plan.size
        if layer.digest is not None:  # reused: the store holds it (see reuse_layers)
            progress.advance("build", size)
            return Descriptor(MEDIA_LAYER, layer.digest, size, layer.plan.annotations)
        paths = paths_of(layer)

        def put(digest: str | None, notes: Notes | None = files.notes) -> str:
            # A digest known before the layer is written was made from bytes checked against the
            # lock (or stamped as checked), and every store checks the stream against the digest it
            # is given: that one sha256 pass proves the files as well, so they are not hashed again.
            def source() -> Iterator[Chunk]:
                for chunk in layer_bytes(layer, paths, check=digest is None, notes=notes):
                    progress.advance("build", len(chunk))
                    yield chunk

            return store.put_blob(repo, size, source, digest=digest)

        try:
            try:
                layer.digest = put(digest)
            except DigestMismatch:
                if digest is None:
                    raise
                # Not the layer the cache remembers: check each file against the lock to find out why,
                # stamped or not (bytes that rotted under an unchanged mtime end up here).
                log.warning("%s: %s: not the cached layer %s; checking its files", repo, layer.plan.description, digest)
                layer.digest = put(None, notes=None)
        except SourceChanged as exc:  # bad bytes: nothing was stored; replace the file once
            paths[exc.member.path] = files.replace(exc.member.path, exc.seen)
            layer.digest = put(None, notes=None)  # and trust no note of a layer that had one bad file
        if cache is not None:
            cache.put(layer.plan.annotations[ANN_LAYER_KEY], layer.digest, size)
        return Descriptor(MEDIA_LAYER, layer.digest, size, layer.plan.annotations)

    def image_of(digests: Sequence[str]) -> BuiltImage:
        return build_image(
            [
                (layer.plan, Descriptor(MEDIA_LAYER, digest, layer.plan.size, layer.plan.annotations))
                for layer, digest in zip(layers, digests, strict=True)
            ],
            ImageMeta.of(model, entry.source, entry.commit),
            params,
            platforms=platforms,
            base=base.platforms if base is not None else None,
        )

    def put_config(config: bytes) -> str:
        return store.put_blob(repo, len(config), lambda: [config], digest_of(config))

    def put_configs(image: BuiltImage) -> list[Future[str]]:
        if image.digest in named.values():  # the store holds this image: nothing of it is put again
            return []
        return [pool.submit(put_config, config) for config in image.configs]

    if base is not None:
        store.known_in(base.blobs(), base.store, base.repo)
        copy_blobs(base.store, base.repo, store, repo, base.blobs(), jobs=jobs, progress=progress)
    with worker_pool(jobs) as pool:
        planned = [known(layer) for layer in layers]
        early: BuiltImage | None = None
        configs: list[Future[str]] = []
        if all(d is not None or layer.plan.size < LARGE_FILE for layer, d in zip(layers, planned, strict=True)):
            planned = list(pool.map(lambda layer, d: d or hashed(layer), layers, planned))
            if all(d is not None for d in planned):
                early = image_of([d for d in planned if d is not None])
                configs = put_configs(early)
        written = [d.digest for d in pool.map(write_layer, layers, planned)]
        image = image_of(written)
        if early is None or early.digest != image.digest:  # a remembered digest proved wrong
            configs += put_configs(image)
        for done in configs:
            done.result()
        # each manifest's blobs are all in now; side by side, one round trip
        if image.digest not in named.values():
            list(pool.map(lambda manifest: store.put_manifest(repo, manifest, MEDIA_MANIFEST), image.manifests))
    for ref in store.tags_for(model, tags or []):
        if named.get(ref) != image.digest:
            store.put_manifest(repo, image.index, MEDIA_INDEX, ref=ref)
    return image.digest
