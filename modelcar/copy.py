"""Copy images between stores by digest: `push`, `mirror` and the registry half of `build`.

Every blob and manifest keeps its exact bytes, so the digest the lock pins is valid in every
store an image is copied to. What the destination already holds is skipped (HEAD), a blob it
holds in another repository is mounted, the rest streams through: nothing is staged on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from modelcar.catalog import Catalog
from modelcar.errors import ModelcarError
from modelcar.lock import Lock, LockedModel, read_lock, save_entries
from modelcar.pipeline import image_tags, recorded_image
from modelcar.progress import Progress
from modelcar.stores import Store, StoredImage, read_image
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry import RegistryOptions, RegistryStore

log = logging.getLogger("modelcar")


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
) -> StoredImage:
    """Copy the image `digest` with all it references; name it `tags` at the destination."""
    progress = progress or Progress(enabled=False)
    image = read_image(src, src_repo, digest)
    skipped = 0

    def copy_blob(desc_digest: str, size: int) -> None:
        nonlocal skipped
        if dst.has_blob(dst_repo, desc_digest):
            skipped += 1
            progress.advance("copy", size)
            return

        def source() -> Iterator[bytes]:
            for chunk in src.open_blob(src_repo, desc_digest):
                progress.advance("copy", len(chunk))
                yield chunk

        dst.put_blob(dst_repo, size, source, desc_digest)

    blobs = image.blobs()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda d: copy_blob(d.digest, d.size), blobs))
    if image.is_index:
        for desc, data in image.manifests:
            dst.put_manifest(dst_repo, data, desc.media_type)
    refs: list[str | None] = list(tags) or [None]
    for ref in refs:
        dst.put_manifest(dst_repo, image.data, image.media_type, ref=ref)
    log.debug("%s -> %s: %d blobs, %d already there", src_repo, dst_repo, len(blobs), skipped)
    return image


@dataclass
class CopyResult:
    name: str
    digest: str
    source: str
    destination: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "digest": self.digest, "from": self.source, "to": self.destination}


def _pinned(catalog: Catalog, lock: Lock, name: str) -> tuple[LockedModel, str]:
    entry = lock.models.get(name)
    if entry is None or entry.image is None or entry.image.digest is None:
        raise ModelcarError(f"{catalog.lock_file}: {name}: no image digest in the lock: run `modelcar build {name}`")
    return entry, entry.image.digest


def source_of_image(
    entry: LockedModel, name: str, digest: str, layout: LayoutStore, options: RegistryOptions
) -> tuple[Store, str]:
    """Where to read a locked image when no --from is given: the local layout when it holds it,
    else the registry repository the lock records."""
    if layout.has_blob(name, digest):
        return layout, name
    repository = entry.image.repository if entry.image else None
    if repository:
        host, _, path = repository.partition("/")
        return RegistryStore(host, options), path
    raise ModelcarError(
        f"{name}: {digest} is neither in {layout} nor pushed anywhere the lock records: "
        "run `modelcar build` or pass --from"
    )


def push_models(
    catalog: Catalog,
    names: list[str] | None,
    registry: RegistryStore,
    layout: LayoutStore,
    *,
    jobs: int = 4,
    progress: Progress | None = None,
) -> list[CopyResult]:
    """Copy built images from the layout to the registry, tag them, record where they went."""
    lock = read_lock(catalog.lock_file)
    results = []
    updates = {}
    for spec in catalog.select(names):
        entry, digest = _pinned(catalog, lock, spec.name)
        if not layout.has_blob(spec.name, digest):
            raise ModelcarError(f"{layout}: {spec.name}: {digest} is not there: run `modelcar build {spec.name}`")
        repo = registry.image_name(spec.name)
        copy_image(layout, spec.name, digest, registry, repo, image_tags(spec, entry), jobs=jobs, progress=progress)
        entry.image = recorded_image(entry.image, digest, registry.repository(spec.name))
        updates[spec.name] = entry
        results.append(CopyResult(spec.name, digest, str(layout), f"{registry.host}/{repo}"))
        log.info("%s: %s -> %s/%s", spec.name, digest, registry.host, repo)
    save_entries(catalog, updates)
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
    """Copy every selected locked image, by digest, into `destination` (the lock stays as it is)."""
    lock = read_lock(catalog.lock_file)
    results = []
    for spec in catalog.select(names):
        entry, digest = _pinned(catalog, lock, spec.name)
        src, src_repo = (
            (source, source.image_name(spec.name))
            if source
            else source_of_image(entry, spec.name, digest, layout, options)
        )
        dst_repo = destination.image_name(spec.name)
        tags = destination.tags_for(spec.name, image_tags(spec, entry))
        copy_image(src, src_repo, digest, destination, dst_repo, tags, jobs=jobs, progress=progress)
        results.append(CopyResult(spec.name, digest, f"{src}", f"{destination}"))
        log.info("%s: %s -> %s", spec.name, digest, destination)
    return results
