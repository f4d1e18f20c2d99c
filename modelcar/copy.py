"""Copy images between stores by digest: `push`, `mirror`, and a base image's blobs for `build`.

Every blob and manifest keeps its exact bytes, so the digest the lock pins is valid in every
store an image is copied to. What the destination already holds is skipped (HEAD), a blob it
holds in another repository is mounted, the rest streams through: nothing is staged on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from modelcar.catalog import Catalog, ModelSpec
from modelcar.describe import human_size
from modelcar.errors import (
    DigestMismatch,
    InputError,
    IntegrityError,
    ModelcarError,
    NotBuilt,
    PartialFailure,
    os_error_message,
)
from modelcar.image import ANN_FILE_PATH, Descriptor
from modelcar.locate import Located, Registries, locate, pinned
from modelcar.lock import LockedModel, Recorded, image_tags, read_lock, record_images
from modelcar.progress import Progress, Transfer
from modelcar.retry import RetryPolicy, call_with_retry, worker_pool
from modelcar.stores import LOOKUPS, Store, StoredImage, read_blob, read_image
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry import RegistryStore
from modelcar.stores.registry_client import RegistryOptions
from modelcar.stores.spec import open_store

log = logging.getLogger("modelcar")


def check_blob_sizes(dst: Store, sizes: Iterable[tuple[str, int]], what: str) -> None:
    """Refuse, before any upload, a blob over the destination's per-layer limit (GHCR: 10 GB).
    `sizes`: each layer's name in a message (its file, or its digest) and size."""
    limit = dst.max_blob_size
    if limit is None:
        return
    for name, size in sizes:
        if size > limit:
            raise InputError(  # the file or --max-layer-size is to change: again, the same answer
                f"{what}: layer {name} is {size} bytes ({human_size(size)}), over the {limit}-byte "
                f"({human_size(limit)}) layer limit of {dst} "
                "(--max-layer-size): split the file, or raise the limit if this registry allows it"
            )


def copy_blobs(
    src: Store,
    src_repo: str,
    dst: Store,
    dst_repo: str,
    blobs: Iterable[Descriptor],
    *,
    jobs: int = 4,
    progress: Progress | None = None,
    retry: RetryPolicy | None = None,
) -> int:
    """Stream blobs the destination lacks from `src`; return how many it already had. With
    `retry`, a blob whose transfer fails midway (the source's connection dropped) is copied
    again from the start, for destinations that do not retry by themselves."""
    progress = progress or Progress(enabled=False)
    skipped = 0

    def copy_blob(blob: Descriptor) -> None:
        nonlocal skipped
        if dst.has_blob(dst_repo, blob.digest, blob.size):
            skipped += 1
            progress.advance("copy", blob.size)
            return

        transfer = Transfer(progress, "copy")

        def source() -> Iterator[bytes]:
            return transfer.attempt(read_blob(src, src_repo, blob))

        def put() -> None:
            try:
                dst.put_blob(dst_repo, blob.size, source, blob.digest)
            except DigestMismatch as exc:  # every store checks what it is given: the source's copy is bad
                raise IntegrityError(
                    f"{src}: blob {blob.digest} does not read back as itself ({exc}): the copy there is "
                    "damaged; `modelcar verify` says which models it breaks"
                ) from None

        if retry is None or dst.retries_puts:
            put()
        else:
            call_with_retry(put, f"{dst}: {blob.digest} from {src}", retry)

    blobs = list(blobs)
    with progress.bar("copy", sum(b.size for b in blobs), f"copy {dst_repo}"), worker_pool(jobs) as pool:
        list(pool.map(copy_blob, blobs))
    return skipped


def copy_image(
    src: Store,
    src_repo: str,
    digest: str,
    dst: Store,
    dst_repo: str,
    tags: list[str],
    *,
    jobs: int = 4,
    progress: Progress | None = None,
    retry: RetryPolicy | None = None,
    pushed_to: str | None = None,
    there: bool,
) -> bool:
    """Copy the image `digest` with all it references; name it `tags` at the destination. Whether
    anything was copied: not when the destination has it all (`there`: what `images_there` said).
    `pushed_to`: a repository the lock records the image in (`HOST/PATH`); one of the destination
    registry's is a source of mounts, whatever store the image is read from."""
    if there:
        log.debug("%s -> %s: %s is there, named %s", src_repo, dst_repo, digest, ", ".join(tags) or "by digest")
        return False
    refs: list[str | None] = list(tags) or [None]
    image = read_image(src, src_repo, digest)
    blobs = image.blobs()
    check_blob_sizes(dst, [(b.annotations.get(ANN_FILE_PATH, b.digest), b.size) for b in blobs], f"{src_repo}@{digest}")
    dst.known_in(blobs, src, src_repo)  # another repository of the same registry: mounted, not sent
    if pushed_to is not None and (pushed := dst.repo_of(pushed_to)) not in (None, dst_repo):
        # a layout or an archive pushed to a second prefix of the registry that has it: nothing sent
        # (where it is gone from there, each mount is answered with an upload, and the bytes go up)
        dst.known_in(blobs, dst, str(pushed))
    skipped = copy_blobs(src, src_repo, dst, dst_repo, blobs, jobs=jobs, progress=progress, retry=retry)
    with worker_pool(min(max(len(image.manifests), len(refs)), LOOKUPS)) as pool:
        if image.is_index:  # each platform's manifest, side by side, before the index that names them
            list(pool.map(lambda m: dst.put_manifest(dst_repo, m[1], m[0].media_type), image.manifests))
        list(pool.map(lambda ref: dst.put_manifest(dst_repo, image.data, image.media_type, ref=ref), refs))
    log.debug("%s -> %s: %d blobs, %d already there", src_repo, dst_repo, len(blobs), skipped)
    return True


def image_there(dst: Store, dst_repo: str, digest: str, tags: list[str], image: Callable[[], StoredImage]) -> bool:
    """Whether every name there names the image already and the store holds it whole (`image`:
    as its source has it, read only where the store needs it): asked before the source is read,
    the first name, then the others at once, so that a push or mirror that finds everything there
    costs two or three round trips per model, and writes nothing."""
    first, *rest = tags or [digest]
    if dst.named_digest(dst_repo, first) != digest:  # a first push asks one question, not one a tag
        return False
    with worker_pool(min(len(rest), LOOKUPS)) as pool:
        named = list(pool.map(lambda ref: dst.named_digest(dst_repo, ref), rest))
    return all(d == digest for d in named) and dst.holds(dst_repo, digest, image)


def images_there(dst: Store, asked: Sequence[tuple[Store, str, str, str, list[str]]]) -> list[bool]:
    """`image_there` of many images (source, its repo, digest, repo here, tags) side by side: a
    push of 40 models that finds them all there took 40 times its round trips, one model after
    another. One that cannot be asked is copied (its error says itself there)."""

    def ask(item: tuple[Store, str, str, str, list[str]]) -> bool:
        src, src_repo, digest, dst_repo, tags = item
        try:
            return image_there(dst, dst_repo, digest, tags, lambda: read_image(src, src_repo, digest))
        except (ModelcarError, OSError):
            return False

    with worker_pool(min(len(asked), LOOKUPS // 2)) as pool:  # each asks LOOKUPS at once itself
        return list(pool.map(ask, asked))


@dataclass
class CopyResult:
    name: str
    digest: str
    source: str
    destination: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "digest": self.digest, "from": self.source, "to": self.destination}


def push_models(
    catalog: Catalog,
    names: list[str] | None,
    registry: RegistryStore,
    layout: LayoutStore,
    *,
    jobs: int = 4,
    progress: Progress | None = None,
) -> list[CopyResult]:
    """Copy built images from the layout to the registry, tag them, record where they went. A
    model that fails does not stop the others, and what went up is recorded whatever happens
    after it (a failure, an interrupt): CopyFailed at the end names each failure."""
    lock = read_lock(catalog.lock_file)
    results = []
    updates: dict[str, Recorded] = {}
    errors: dict[str, BaseException] = {}

    def record() -> dict[str, str]:
        return record_images(catalog, updates, "pushed", "push again (nothing is sent twice)") if updates else {}

    ready: list[tuple[ModelSpec, LockedModel, str]] = []
    for spec in catalog.select(names):
        try:
            entry, digest = pinned(catalog, lock, spec.name)
            if not layout.has_blob(spec.name, digest):
                raise NotBuilt(f"{layout}: {digest} is not there: run `modelcar build {spec.name}`")
        except (ModelcarError, OSError) as exc:
            errors[spec.name] = exc
            continue
        ready.append((spec, entry, digest))
    asked = [(layout, s.name, d, registry.image_name(s.name), image_tags(s, e)) for s, e, d in ready]
    try:
        for (spec, entry, digest), there in zip(ready, images_there(registry, asked), strict=True):
            repo = registry.image_name(spec.name)
            try:
                copied = copy_image(
                    layout, spec.name, digest, registry, repo, image_tags(spec, entry), jobs=jobs, progress=progress,
                    pushed_to=entry.repository, there=there,
                )  # fmt: skip
            except (ModelcarError, OSError) as exc:
                errors[spec.name] = exc
                continue
            updates[spec.name] = Recorded(spec, entry, digest, registry.repository(spec.name), built=False)
            results.append(CopyResult(spec.name, digest, str(layout), f"{registry.host}/{repo}"))
            log.info("%s: %s %s %s/%s", spec.name, digest, "->" if copied else "already in", registry.host, repo)
    except BaseException:  # an interrupt: what went up is recorded, or said not to be, all the same
        for line in dict.fromkeys(record().values()):
            log.error("%s", line)
        raise
    unrecorded = record()  # the lock that could not be written: said with the models' failures
    if errors or unrecorded:
        failed = CopyFailed.of(errors, results, *dict.fromkeys(unrecorded.values()))
        # pushed, but not in the lock: failed too, for a reader of `errors` (or of --json's `failed`)
        failed.errors |= {name: ModelcarError(line) for name, line in unrecorded.items()}
        raise failed
    return results


def mirror_models(
    catalog: Catalog,
    names: list[str] | None,
    destination: Store,
    *,
    source: Store | None = None,
    layout: LayoutStore,
    options: RegistryOptions,
    jobs: int = 4,
    progress: Progress | None = None,
) -> list[CopyResult]:
    """Copy every selected locked image, by digest, into `destination` (the lock stays as it is).
    A model that fails does not stop the others: CopyFailed at the end names each failure and
    carries what was copied (whole images: a store names an image only once it holds its blobs)."""
    lock = read_lock(catalog.lock_file)
    results = []
    errors: dict[str, BaseException] = {}
    with Registries(options) as registries:
        ready: list[tuple[ModelSpec, Located, list[str]]] = []
        for spec in catalog.select(names):
            try:
                src = locate(catalog, lock, spec.name, source=source, layout=layout, registries=registries)
            except (ModelcarError, OSError) as exc:
                errors[spec.name] = exc
                continue
            ready.append((spec, src, destination.tags_for(spec.name, image_tags(spec, src.entry))))
        asked = [(src.store, src.repo, src.digest, destination.image_name(s.name), tags) for s, src, tags in ready]
        # a store written anew (--no-cache) holds nothing yet, as far as this run trusts
        theres = [False] * len(asked) if destination.rewrite else images_there(destination, asked)
        for (spec, src, tags), there in zip(ready, theres, strict=True):
            try:
                with destination.all_or_nothing():  # what failed is kept out, its blobs too where they can be
                    copied = copy_image(
                        src.store, src.repo, src.digest, destination, destination.image_name(spec.name), tags,
                        jobs=jobs, progress=progress, retry=options.retry, pushed_to=src.entry.repository, there=there,
                    )  # fmt: skip
            except (ModelcarError, OSError) as exc:
                errors[spec.name] = exc
                continue
            results.append(CopyResult(spec.name, src.digest, f"{src.store}", f"{destination}"))
            log.info("%s: %s %s %s", spec.name, src.digest, "->" if copied else "already in", destination)
    if errors:
        raise CopyFailed.of(errors, results)
    return results


class CopyFailed(PartialFailure[CopyResult]):
    """Some models were not copied; `results` has the ones that were."""


def mirror_into(
    catalog: Catalog,
    names: list[str] | None,
    to: str,
    *,
    source: Store | None = None,
    layout: LayoutStore,
    options: RegistryOptions,
    jobs: int = 4,
    progress: Progress | None = None,
    no_cache: bool = False,
) -> list[CopyResult]:
    """`mirror_models` into the store `to` names (`HOST/PATH`, `oci:DIR`, `oci-archive:FILE`),
    finished (an archive written) when at least one model was copied: what failed is kept out,
    what was copied is kept. CopyFailed names each failure, and why the store could not be
    finished when it could not (an archive is then not written at all). With `no_cache`, what a
    layout or archive holds is not trusted: each image's blobs are written again (a damaged copy
    replaced)."""
    failed: CopyFailed | None = None
    try:
        with open_store(to, options, write=True, rewrite=no_cache) as dst:
            try:
                return mirror_models(
                    catalog, names, dst, source=source, layout=layout, options=options, jobs=jobs, progress=progress
                )
            except CopyFailed as exc:
                if not exc.results:
                    raise  # nothing copied: nothing written (no empty archive)
                failed = exc
    except (ModelcarError, OSError) as exc:
        if failed is None or exc is failed:
            raise
        why = f"{to}: not written: {os_error_message(exc)}" if isinstance(exc, OSError) else str(exc)
        lost = {r.name: ModelcarError(why) for r in failed.results}  # copied, and gone with the store
        raise CopyFailed(f"{failed}\n{why}", [], {**failed.errors, **lost}) from None
    raise failed
