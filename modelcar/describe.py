"""What an image holds, for `modelcar inspect`: files, layers, sizes, annotations, from any store."""

from __future__ import annotations

import io
import logging
import tarfile
from typing import Any

from modelcar.errors import BlobNotFound, IntegrityError
from modelcar.fsutil import PIECE, ChunkReader
from modelcar.image import ANN_FILE_PATH, ANN_FILE_SHA256, ANN_FILES, MEDIA_LAYER, Descriptor
from modelcar.retry import worker_pool
from modelcar.stores import LOOKUPS, Store, read_blob, read_image
from modelcar.tarlayer import read_files

log = logging.getLogger("modelcar")


def human_size(n: int) -> str:
    """`n` bytes as a person reads them: 345 B, 2.1 KiB, 9.0 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    """`1 layer`, `2 layers`: counts in messages as a person writes them."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


HEADER_BYTES = 64 << 10  # a one-file layer's tar headers: PAX records for any path fit


def _file_size(store: Store, repo: str, layer: Descriptor) -> int | None:
    """The size of a one-file layer's file, from the tar header in front of it: the layer's first
    bytes are read, not its gigabytes (its own size rounds the file's up to 512 bytes). None where
    the blob is gone or damaged (`verify` says which; inspect still shows the rest); a store that
    cannot be read (an outage, a refusal) fails inspect, as it did before."""
    try:
        head = store.blob_head(repo, layer.digest, min(HEADER_BYTES, layer.size))
        for _, size, _ in read_files(io.BytesIO(head)):
            return size
        raise tarfile.ReadError("no file under models/ in its first bytes")
    except (BlobNotFound, tarfile.TarError) as exc:
        log.warning("%s: layer %s: its file's size is unknown: %s", repo, layer.digest, exc)
    return None


def describe_image(store: Store, repo: str, ref: str) -> dict[str, Any]:
    """A JSON-ready description; reads the small-files layer (to list its files) and, of each
    weight layer, the tar header in front of its file (for the file's size), not the file."""
    image = read_image(store, repo, ref)
    root = image.parsed()
    # Each platform's own layers (a base's differ from one platform to the next; the model's are
    # the same in all), and each layer once in the listing, in the order the platforms give them.
    by_platform = image.platform_layers()
    platforms = [
        {**desc.platform, "digest": desc.digest, "bytes": sum(layer.size for layer in own)}
        for desc, own in by_platform
        if desc.platform
    ]
    layers = []
    files: list[dict[str, Any]] = []
    all_layers = list({layer.digest: layer for _, own in by_platform for layer in own}.values())
    weights = [layer for layer in all_layers if ANN_FILE_PATH in layer.annotations]
    with worker_pool(LOOKUPS, "inspect") as pool:  # a round trip each, asked together
        found = pool.map(lambda layer: _file_size(store, repo, layer), weights)
        sizes = {layer.digest: size for layer, size in zip(weights, found, strict=True)}
    for layer in all_layers:
        ann = layer.annotations
        entry: dict[str, Any] = {"digest": layer.digest, "size": layer.size, "mediaType": layer.media_type}
        if ann:
            entry["annotations"] = ann
        if ANN_FILE_PATH in ann:
            entry["files"] = [ann[ANN_FILE_PATH]]
            files.append(
                {
                    "path": ann[ANN_FILE_PATH],
                    "size": sizes[layer.digest],
                    "sha256": ann.get(ANN_FILE_SHA256),
                    "layer": layer.digest,
                }
            )
        elif ANN_FILES in ann and layer.media_type == MEDIA_LAYER:
            listed = []
            reader = ChunkReader(read_blob(store, repo, layer))
            try:
                for path, size, member in read_files(reader):
                    while member.read(PIECE):
                        pass
                    listed.append(path)
                    files.append({"path": path, "size": size, "layer": layer.digest})
            except (tarfile.TarError, EOFError) as exc:
                raise IntegrityError(f"{store}: {repo}: layer {layer.digest}: not a readable tar ({exc})") from None
            # read to its end, so a listing is only given of the layer its digest names (tarfile
            # takes a header it cannot read for the end of the archive, and reads no end blocks)
            if not reader.ends_as(layer.digest, layer.size):
                raise IntegrityError(
                    f"{store}: {repo}: layer {layer.digest}: the stored bytes have digest {reader.digest} "
                    f"({reader.count} bytes): the image is damaged (`modelcar verify` checks all of it)"
                )
            entry["files"] = listed
        layers.append(entry)
    unlisted = [layer.digest for layer in all_layers if not layer.annotations.keys() & {ANN_FILE_PATH, ANN_FILES}]
    if unlisted and not files:  # said, not an empty listing that reads as an image of no files
        log.warning(
            "%s: %s: no layer says which files it holds (%d without modelcar's annotations: another tool's "
            "image, or a modelcar image copied without --preserve-digests, which recompresses its layers)",
            store,
            repo,
            len(unlisted),
        )
    return {
        "reference": store.reference(repo, image.digest),
        "digest": image.digest,
        "mediaType": image.media_type,
        "annotations": root.get("annotations", {}),
        "platforms": platforms,
        "layers": layers,
        "files": sorted(files, key=lambda f: str(f["path"])),
        "bytes": sum(layer["size"] for layer in layers),
    }
