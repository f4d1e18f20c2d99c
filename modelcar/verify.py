"""Read an image back from a store and check it against the lock, byte for byte.

Every manifest and config is checked against the digest that names it, every blob is streamed
once (a layer's digest and the sha256 of each file inside it computed in the same pass), and
each platform's image must hold exactly the lock's files under /models, as files. A mismatch is
reported, never repaired: `modelcar build --no-cache` makes the image anew.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import tarfile
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from modelcar.catalog import Catalog, ModelSpec
from modelcar.errors import InputError, IntegrityError, ModelcarError, error_message
from modelcar.fsutil import PIECE, ChunkReader
from modelcar.image import ANN_LAYER_KEY, MEDIA_LAYER, Descriptor, digest_of, platform_name
from modelcar.locate import Registries, locate
from modelcar.lock import LockedModel, image_tags, read_lock
from modelcar.progress import Progress, Transfer
from modelcar.retry import Flights, RetryPolicy, call_with_retry, worker_pool
from modelcar.stores import Store, read_blob, read_image
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry import RegistryStore
from modelcar.stores.registry_client import RegistryOptions
from modelcar.tarlayer import EXCLUDE_WHITEOUTS, WHITEOUT_REASON, is_whiteout, read_files

GZIP_LAYER = MEDIA_LAYER + "+gzip"
R = TypeVar("R")


@dataclass
class _Layer:
    """What one read of a layer found: each file under models/ (size, sha256), the entries there
    that are no files, and what went wrong."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    odd: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unread: bool = False


# One run's layer reads, by store, repository (none where the store keeps a blob once for all its
# images) and descriptor (digest, size and media type: what a read checks it against): models that
# share a layer (two revisions of one repo, the shards unchanged) read it once.
LayerReads = Flights[tuple[Store, str, str, int, str], _Layer]


def _read_layer(store: Store, repo: str, layer: Descriptor, transfer: Transfer | None = None) -> _Layer:
    """One pass over a layer: its digest and size, and (for a tar, plain or gzip) each file's
    size and sha256. Other layer types (zstd) are only hashed. `transfer`: counts the bytes read."""
    chunks = read_blob(store, repo, layer)
    reader = ChunkReader(transfer.attempt(chunks) if transfer is not None else chunks)
    found = _Layer()
    try:
        if layer.media_type in (MEDIA_LAYER, GZIP_LAYER):
            for path, size, f in read_files(reader, gzip=layer.media_type == GZIP_LAYER, odd=found.odd):
                h = hashlib.sha256()
                while chunk := f.read(PIECE):
                    h.update(chunk)
                found.files[path] = (size, h.hexdigest())
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        found.problems.append(f"layer {layer.digest}: not a readable tar ({exc})")
        found.unread = True  # its files are not missing: they are in a layer that cannot be read
    if not reader.ends_as(layer.digest, layer.size):
        found.problems.append(
            f"layer {layer.digest}: the stored bytes have digest {reader.digest} ({reader.count} bytes)"
        )
        found.unread = True  # what it seems to hold says nothing of what is missing: the layer is damaged
    return found


def _against_lock(entry: LockedModel, layers: list[tuple[Descriptor, _Layer]]) -> list[str]:
    """What the files under /models of one platform's image (its layers in order) are, compared
    with the lock: each lock file exactly once, as a file, and nothing else."""
    problems: list[str] = []
    found: dict[str, tuple[int, str]] = {}
    based: dict[str, str] = {}  # files a base layer (one modelcar did not make) put there: its digest
    for desc, layer in layers:
        problems += [f"{odd}: not a file" for odd in layer.odd]
        for path, value in layer.files.items():
            if path in found:
                problems.append(f"{path}: in more than one layer")
            found[path] = value
            if ANN_LAYER_KEY not in desc.annotations:
                based[path] = desc.digest
    unread = any(layer.unread for _, layer in layers)  # its files cannot be said to be missing
    locked = {f.path: (f.size, f.sha256) for f in entry.files}
    for path in sorted(set(locked) | set(found)):
        if is_whiteout(path):  # an image built before `lock` refused them: the tar has it, the pod does not
            problems.append(f"{path}: {WHITEOUT_REASON}: lock again with `{EXCLUDE_WHITEOUTS}` and build")
        elif path not in found:
            if not unread:
                problems.append(f"{path}: in the lock, missing from the image")
        elif path in based and path not in locked:
            problems.append(
                f"{path}: in the base image's layer {based[path]}, not in the lock: vLLM would read it with "
                "the model; pick a base with nothing under /models"
            )
        elif path not in locked:
            problems.append(f"{path}: in the image, not in the lock")
        elif found[path] != locked[path]:
            problems.append(
                f"{path}: sha256 {found[path][1]} ({found[path][0]} bytes), the lock has "
                f"{locked[path][1]} ({locked[path][0]} bytes)"
            )
    return problems


def verify_image(
    store: Store,
    repo: str,
    entry: LockedModel,
    retry: RetryPolicy | None = None,
    pool: Executor | None = None,
    progress: Progress | None = None,
    reads: LayerReads | None = None,
) -> list[str]:
    """Problems found in the image the lock pins for this entry; empty when it is intact. Every
    blob is read (base layers too: a store that lost one serves a broken image), and each
    platform's image is checked on its own: the lock's files, all of them, in every one. With
    `retry`, a layer whose transfer drops midway is read again from the start (as a mirror does);
    with `pool`, its blobs are read in the pool's workers, all asked for at once; with
    `progress`, a bar counts the layers' bytes as they are read (a 100 GB model takes minutes);
    with `reads`, a layer another image's check read (or is reading) is not read again."""
    progress = progress or Progress(enabled=False)
    if entry.image is None or entry.image.digest is None:
        return ["the lock has no image digest: run `modelcar build` first"]
    image = read_image(store, repo, entry.image.digest)  # not there, or not reached: the caller says which

    # A store's refusal (ModelcarError) is a problem of this image; a blob this user may not read
    # (OSError) is no sign of damage: it ends the check of this model (verify_models says it, and
    # offers no rebuild).
    def read_config(desc: Descriptor) -> bytes | ModelcarError:
        try:
            return b"".join(read_blob(store, repo, desc))
        except ModelcarError as exc:  # said as a problem of this image, as an unreadable layer is
            return exc

    def read_layer(layer: Descriptor) -> _Layer:
        once = functools.partial(_read_layer, store, repo, layer, Transfer(progress, repo))
        try:
            return call_with_retry(once, f"{repo}: {layer.digest}", retry) if retry else once()
        except ModelcarError as exc:
            return _Layer(problems=[f"layer {layer.digest}: cannot be read: {exc}"], unread=True)

    def read_layer_once(layer: Descriptor) -> _Layer:
        if reads is None:
            return read_layer(layer)
        mine = False

        def read() -> _Layer:
            nonlocal mine
            mine = True
            return read_layer(layer)

        key = (store, "" if store.blobs_shared else repo, layer.digest, layer.size, layer.media_type)
        found = reads.once(key, read)
        if not mine:  # read for another image: this one's bar counts it all the same
            progress.advance(repo, layer.size)
        return found

    def start(read: Callable[[Descriptor], R], desc: Descriptor) -> Callable[[], R]:
        """The read begun in the pool (its answer when asked for), or, without one, made then."""
        return pool.submit(read, desc).result if pool is not None else functools.partial(read, desc)

    parsed = []
    for desc, data in image.manifests:
        manifest = json.loads(data)
        layers = [Descriptor.from_json(d) for d in manifest["layers"]]
        parsed.append((desc.platform or {}, Descriptor.from_json(manifest["config"]), layers))
    # every blob of the image asked for at once: configs first, each layer once
    configs = [start(read_config, config_desc) for _, config_desc, _ in parsed]
    unique = {layer.digest: layer for _, _, layers in parsed for layer in layers}

    def check_configs() -> tuple[list[str], list[tuple[str, list[Descriptor]]]]:
        """Each platform's config against its manifest, while the layers are read."""
        problems: list[str] = []
        platforms: list[tuple[str, list[Descriptor]]] = []
        for (platform, config_desc, layers), config_read in zip(parsed, configs, strict=True):
            platforms.append((platform_name(platform), layers))
            config_bytes = config_read()
            if isinstance(config_bytes, ModelcarError):
                problems.append(f"config {config_desc.digest}: cannot be read: {config_bytes}")
                continue
            if digest_of(config_bytes) != config_desc.digest:
                problems.append(f"config {config_desc.digest}: the stored bytes do not match")
                continue
            try:
                config = json.loads(config_bytes)
            except ValueError:
                config = None
            if not isinstance(config, dict):
                problems.append(f"config {config_desc.digest}: not a JSON object")
                continue
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            if len(diff_ids) != len(layers):
                problems.append(f"config {config_desc.digest}: {len(diff_ids)} diff_ids for {len(layers)} layers")
            for layer, diff_id in zip(layers, diff_ids, strict=False):
                if layer.media_type == MEDIA_LAYER and diff_id != layer.digest:
                    problems.append(f"config {config_desc.digest}: diff_id {diff_id} is not layer {layer.digest}")
            if platform.get("architecture") and config.get("architecture") != platform["architecture"]:
                problems.append(
                    f"config {config_desc.digest}: architecture does not match the index ({platform['architecture']})"
                )
        return problems, platforms

    with progress.bar(repo, sum(layer.size for layer in unique.values()), f"verify {repo}"):
        reading = {digest: start(read_layer_once, layer) for digest, layer in unique.items()}
        problems, platforms = check_configs()
        read = {digest: answer() for digest, answer in reading.items()}
    for found_layer in read.values():
        problems += found_layer.problems
    checked = [
        (name, _against_lock(entry, [(layer, read[layer.digest]) for layer in layers])) for name, layers in platforms
    ]
    if all(found == checked[0][1] for _, found in checked):  # the usual case: the platforms share the layers
        return problems + (checked[0][1] if checked else [])
    return problems + [f"{name or 'image'}: {problem}" for name, found in checked for problem in found]


@dataclass
class Verified:
    """What `verify` found for one model: where it read the image (None: it found none, or the
    model was never built) and the problems found there (none: intact)."""

    store: str | None
    problems: list[str]
    read: bool = True  # False: the image could not be read there (missing, or the store not reached)
    input_error: bool = False  # the catalog or lock is to change (a model not locked), not the image

    @property
    def damaged(self) -> bool:
        """An image read and found wrong: what `build --no-cache` rebuilds (not one the store
        could not be asked about: an outage is no reason to rebuild; nor one wrong only for a
        whiteout name, which `lock` must exclude first: it refuses the model until then)."""
        wrong = [p for p in self.problems if WHITEOUT_REASON not in p and NOT_NAMED not in p]
        return self.store is not None and self.read and bool(wrong)


NOT_NAMED = "what a node loads it by"  # in a problem of the name only: the image itself may be whole


def _naming(store: Store, repo: str, refs: list[str], digest: str) -> list[str]:
    """What a layout or archive named by hand (`verify --from`) says the image is called, against
    the lock: an air-gapped node loads its image by that name (`skopeo copy oci-archive:F:NAME`,
    `ctr import`), and a lock rolled back, or an archive whose entry another mirror replaced, has
    the blobs and not the name. (A registry's images are pulled by digest, and its tags move with
    later builds: not asked.)"""
    problems = []
    for ref in refs:
        if (named := store.named_digest(repo, ref)) == digest:
            continue
        said = "names no image" if named is None else f"names {named}, not the lock's {digest}"
        problems.append(f"{store}: {ref} ({NOT_NAMED}) {said}: `modelcar mirror --to {store}` names it again")
    return problems


def verify_models(
    catalog: Catalog,
    names: list[str] | None,
    *,
    source: Store | None,
    layout: LayoutStore,
    options: RegistryOptions,
    jobs: int = 4,
    progress: Progress | None = None,
) -> dict[str, Verified]:
    """Per model, where its image was read (`source`, or where it lives) and the problems found
    (none when it is intact). Models are checked `jobs` at a time, and so are the blobs read;
    with `progress`, a bar per model counts its bytes read."""
    lock = read_lock(catalog.lock_file)
    reads: LayerReads = Flights()

    def one(spec: ModelSpec, registries: Registries, blobs: Executor) -> Verified:
        name = spec.name
        # A store this user may not read (a layout of another's, mode 0700) is this model's problem:
        # the others are checked all the same.
        try:
            found = locate(catalog, lock, name, source=source, layout=layout, registries=registries)
        except (ModelcarError, OSError) as exc:
            return Verified(None, [error_message(exc)], input_error=isinstance(exc, InputError))
        try:
            problems = verify_image(found.store, found.repo, found.entry, options.retry, blobs, progress, reads)
            if source is not None and not isinstance(found.store, RegistryStore):
                refs = found.store.tags_for(name, image_tags(spec, found.entry))
                problems += _naming(found.store, found.repo, refs, found.digest)
        except IntegrityError as exc:  # its manifests were read, and are not what their digests say
            return Verified(str(found.store), [str(exc)])
        except (ModelcarError, OSError) as exc:  # not read: not there, the store not reached, or not ours to read
            return Verified(str(found.store), [error_message(exc)], read=False)
        return Verified(str(found.store), problems)

    with (
        Registries(options) as registries,
        worker_pool(jobs, "verify") as models,
        worker_pool(jobs, "verify-blobs") as blobs,
    ):
        checking = {spec.name: models.submit(one, spec, registries, blobs) for spec in catalog.select(names)}
        return {name: flight.result() for name, flight in checking.items()}
