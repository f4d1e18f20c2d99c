"""Read an image back from a store and check it against the lock, byte for byte.

Every manifest and config is checked against the digest that names it, every layer is streamed
once (its digest and the sha256 of each file inside it computed in the same pass), and the
files found must be exactly the lock's files. A mismatch is reported, never repaired.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tarfile
from dataclasses import dataclass

from modelcar.catalog import Catalog
from modelcar.copy import Registries, locate
from modelcar.errors import ModelcarError
from modelcar.fsutil import READ_CHUNK, ChunkReader
from modelcar.image import MEDIA_LAYER, Descriptor, digest_of
from modelcar.lock import LockedModel, read_lock
from modelcar.retry import RetryPolicy, call_with_retry
from modelcar.stores import Store, read_image
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry import RegistryOptions
from modelcar.tarlayer import read_files


def _read_layer(store: Store, repo: str, digest: str) -> tuple[ChunkReader, dict[str, tuple[int, str]], str | None]:
    """One pass over a layer: the reader (its digest and size), each file's (size, sha256), and
    what made it no readable tar, if anything."""
    reader = ChunkReader(store.open_blob(repo, digest))
    files: dict[str, tuple[int, str]] = {}
    problem = None
    try:
        for path, size, f in read_files(reader):
            h = hashlib.sha256()
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
            files[path] = (size, h.hexdigest())
    except (tarfile.TarError, EOFError) as exc:
        problem = f"layer {digest}: not a readable tar ({exc})"
    reader.drain()
    return reader, files, problem


def verify_image(store: Store, repo: str, entry: LockedModel, retry: RetryPolicy | None = None) -> list[str]:
    """Problems found in the image the lock pins for this entry; empty when it is intact. With
    `retry`, a layer whose transfer drops midway is read again from the start (as a mirror does)."""
    if entry.image is None or entry.image.digest is None:
        return ["the lock has no image digest: run `modelcar build` first"]
    try:
        image = read_image(store, repo, entry.image.digest)
    except ModelcarError as exc:
        return [str(exc)]
    problems: list[str] = []
    found: dict[str, tuple[int, str]] = {}
    for desc, data in image.manifests:
        manifest = json.loads(data)
        config_desc = Descriptor.from_json(manifest["config"])
        config_bytes = b"".join(store.open_blob(repo, config_desc.digest))
        if digest_of(config_bytes) != config_desc.digest:
            problems.append(f"config {config_desc.digest}: the stored bytes do not match")
            continue
        config = json.loads(config_bytes)
        layers = [Descriptor.from_json(d) for d in manifest["layers"]]
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(layers):
            problems.append(f"config {config_desc.digest}: {len(diff_ids)} diff_ids for {len(layers)} layers")
        for layer, diff_id in zip(layers, diff_ids, strict=False):
            if layer.media_type == MEDIA_LAYER and diff_id != layer.digest:
                problems.append(f"config {config_desc.digest}: diff_id {diff_id} is not layer {layer.digest}")
        platform = (desc.platform or {}).get("architecture", "")
        if platform and config.get("architecture") != platform:
            problems.append(f"config {config_desc.digest}: architecture does not match the index ({platform})")
    unread = False  # a layer the store could not serve: its files cannot be said to be missing
    for layer in image.blobs():
        if layer.media_type != MEDIA_LAYER:
            continue  # configs above; compressed base layers carry no model files
        try:
            read = functools.partial(_read_layer, store, repo, layer.digest)
            reader, files, problem = call_with_retry(read, f"{repo}: {layer.digest}", retry) if retry else read()
            found.update(files)
            problems += [problem] if problem else []
        except ModelcarError as exc:
            problems.append(f"layer {layer.digest}: cannot be read: {exc}")
            unread = True
            continue
        if reader.digest != layer.digest or reader.count != layer.size:
            problems.append(
                f"layer {layer.digest}: the stored bytes have digest {reader.digest} ({reader.count} bytes)"
            )
    locked = {f.path: (f.size, f.sha256) for f in entry.files}
    for path in sorted(set(locked) | set(found)):
        if path not in found:
            if not unread:
                problems.append(f"{path}: in the lock, missing from the image")
        elif path not in locked:
            problems.append(f"{path}: in the image, not in the lock")
        elif found[path] != locked[path]:
            problems.append(
                f"{path}: sha256 {found[path][1]} ({found[path][0]} bytes), the lock has "
                f"{locked[path][1]} ({locked[path][0]} bytes)"
            )
    return problems


@dataclass
class Verified:
    """What `verify` found for one model: where it read the image ("" when it found none)."""

    store: str
    problems: list[str]


def verify_models(
    catalog: Catalog,
    names: list[str] | None,
    *,
    source: Store | None,
    layout: LayoutStore,
    options: RegistryOptions,
) -> dict[str, Verified]:
    """Per model, where its image was read (`source`, or where it lives) and the problems found
    (none when it is intact)."""
    lock = read_lock(catalog.lock_file)
    report: dict[str, Verified] = {}
    with Registries(options) as registries:
        for spec in catalog.select(names):
            try:
                found = locate(catalog, lock, spec.name, source=source, layout=layout, registries=registries)
            except ModelcarError as exc:
                report[spec.name] = Verified("", [str(exc)])
                continue
            try:
                problems = verify_image(found.store, found.repo, found.entry, options.retry)
            except ModelcarError as exc:
                problems = [str(exc)]
            report[spec.name] = Verified(str(found.store), problems)
    return report
