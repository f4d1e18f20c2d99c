"""Stores: places images live.

A local OCI image layout and a registry are two implementations of one interface (the
go-containerregistry idea), so building, pushing, mirroring and verifying are all one copy
between two stores. `repo` is the image's name inside the store: the model name for a layout
(its `org.opencontainers.image.ref.name`), `PREFIX/<model>` for a registry.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from modelcar.errors import IntegrityError, ModelcarError, said_of
from modelcar.fsutil import Chunk
from modelcar.image import MEDIA_INDEX, MEDIA_MANIFEST, Descriptor, digest_of, platform_name
from modelcar.retry import worker_pool

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (MEDIA_INDEX, DOCKER_LIST)

DEFAULT_MAX_LAYER = 10_000_000_000  # GHCR's per-layer limit, the strictest of the big registries
LOOKUPS = 8  # small requests (manifests, HEADs) in flight at once: a far registry costs round trips
MANIFEST_MAX = 4 << 20  # bytes of a manifest read at most, from any store (containerd's limit)
INDEX_MAX = 64 << 20  # bytes of a layout's or an archive's index.json read at most (~250,000 images)

# HOST[:PORT]/PATH, the path in the distribution spec's lower-case repository-name grammar
REGISTRY_PREFIX_RE = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$")


_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CREDENTIALS_IN_NAME = "credentials do not go in a registry name: use `docker login` or an auth file (see README)"


def has_credentials(name: str) -> bool:
    """Whether an image reference carries `user:password@` (after a scheme too): such a name must
    never be repeated in a message. An `@` is a digest's only where no `/` follows it; a password
    may hold a `/` of its own."""
    rest = _SCHEME_RE.sub("", name)
    return "@" in rest.split("/", 1)[0] or re.search(r"@[^@]*/", rest) is not None


def registry_prefix_problem(prefix: str) -> str | None:
    """What is wrong with a registry prefix (the catalog's `registry:`, --registry, --from, --to),
    or None. Never repeats credentials written into it (a prefix has no `@` of its own)."""
    if "@" in prefix:
        return CREDENTIALS_IN_NAME
    if _SCHEME_RE.match(prefix):
        return f"{prefix!r} is not a registry prefix: use HOST[:PORT]/PATH, without a scheme"
    if not REGISTRY_PREFIX_RE.fullmatch(prefix):
        return f"{prefix!r} is not a registry prefix: use HOST[:PORT]/PATH, lowercase"
    return None


BlobSource = Callable[[], Iterable[Chunk]]
"""Opens a blob's bytes from the start; called again to rewind when an upload is retried. A chunk
may be a view of a buffer the source reuses: use it before asking for the next."""


class Store(ABC):
    """A place images live: content-addressed blobs plus named roots.

    Used as a context manager: a store that assembles its output (an archive) commits it on a
    clean exit and discards it on an error, so a failed run leaves nothing half-written.
    """

    # Whether put_blob retries a failed transfer itself, the source's failures included (it
    # re-opens the source): a registry does; a copy into a local store retries for it.
    retries_puts = False
    # Whether a blob is one stored copy for all the store's images (a layout's, an archive's): what
    # one read of it found holds for every image that names it. A registry answers per repository.
    blobs_shared = False
    # Whether what the store holds is taken as what its names say (False), or each blob is written
    # again once in this run (True): what `--no-cache` mends a damaged layout or archive with.
    rewrite = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(commit=exc is None)

    def close(self, commit: bool = True) -> None:  # noqa: B027 (a hook: most stores write as they go)
        """Finish writing (commit) or throw away what this run wrote (abort)."""

    @contextmanager
    def all_or_nothing(self) -> Generator[None]:
        """What the block writes stays only if it completes, where the store can take it back (an
        archive cuts off the blobs of an image whose copy failed: not carried to the air gap, nor
        filling the disk another image needed). Elsewhere a failed image's blobs stay, unnamed."""
        yield

    max_blob_size: int | None = None  # a registry's per-layer limit, checked before any upload

    def image_name(self, model: str) -> str:
        """The name a model's image has in this store (`repo` in the methods below)."""
        return model

    def tags_for(self, model: str, tags: list[str]) -> list[str]:
        """The names an image root gets here: the catalog's tags, or what the store uses instead."""
        return tags

    def reference(self, repo: str, digest: str) -> str:
        """The image `repo`@`digest` as `modelcar inspect` reads it (skopeo reads a layout's image
        by its name alone: `oci:DIR:NAME`)."""
        return f"{self}:{repo}@{digest}"

    def repository(self, model: str) -> str | None:
        """Where a model's image lives, as the lock records it; None for local stores."""
        return None

    def known_in(self, blobs: Iterable[Descriptor], other: Store, repo: str) -> None:  # noqa: B027
        """Hint that `other` holds these blobs in `repo`: a registry mounts them from there when it is
        the same one, and does not ask about them again when it is itself."""

    def repo_of(self, repository: str) -> str | None:
        """The repo name here of a repository as the lock records it, when it is in this store."""
        return None

    def mount_blob(self, repo: str, digest: str) -> bool:
        """Make a blob another repository of this store holds (see `known_in`) part of `repo`
        without sending its bytes; whether it now is."""
        return False

    @abstractmethod
    def has_blob(self, repo: str, digest: str, size: int | None = None) -> bool:
        """Whether the store already holds the blob, so the caller can skip reading its source.
        With `size`, a layout's copy of another size counts as missing: a truncated blob is
        written again instead of being trusted by every later build."""

    @abstractmethod
    def put_blob(self, repo: str, size: int, source: BlobSource, digest: str | None = None) -> str:
        """Store a streamed blob of `size` bytes and return its digest.

        With `digest` given, the bytes are checked against it (and the caller may have skipped
        the upload by asking `has_blob` first); without it, the digest is computed on the way.
        A blob whose bytes or size do not match is never made visible.
        """

    @abstractmethod
    def open_blob(self, repo: str, digest: str) -> Iterator[bytes]:
        """The blob's bytes, streamed."""

    @abstractmethod
    def blob_head(self, repo: str, digest: str, size: int) -> bytes:
        """The first `size` bytes of a blob (all of it, if shorter): a header in front of
        gigabytes, read without the rest. Unchecked: a digest covers the whole blob."""

    @abstractmethod
    def put_manifest(self, repo: str, data: bytes, media_type: str, ref: str | None = None) -> str:
        """Store a manifest or index as these exact bytes; with `ref`, also name it; return its digest."""

    @abstractmethod
    def get_manifest(self, repo: str, ref: str) -> bytes:
        """The exact bytes of a manifest or index, by name or digest."""

    def holds(self, repo: str, digest: str, image: Callable[[], StoredImage]) -> bool:
        """Whether the image `digest` (`image`: as its source has it) is here whole, every blob at
        its size (on a disk, a blob may have been cut short since): asked of an image the store
        names already. A store on disk reads its own copy: no round trip to the source."""
        try:
            return all(self.has_blob(repo, b.digest, b.size) for b in read_image(self, repo, digest).blobs())
        except (ModelcarError, OSError):
            return False

    @abstractmethod
    def named_digest(self, repo: str, ref: str) -> str | None:
        """The digest of the manifest or index `ref` (a name or a digest) names here; None where
        it names none. Cheap where it can be (a registry's HEAD): a copy asks it of every name
        before it reads the source at all."""


@dataclass(frozen=True)
class StoredImage:
    """An image as a store holds it: the root's exact bytes and every manifest below it."""

    repo: str
    digest: str
    media_type: str
    data: bytes
    manifests: list[tuple[Descriptor, bytes]]  # the root itself when it is a single manifest

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def parsed(self) -> dict[str, Any]:
        return dict(json.loads(self.data))

    def blobs(self) -> list[Descriptor]:
        """Configs and layers of every manifest, each once, in manifest order."""
        seen: dict[str, Descriptor] = {}
        for _, data in self.manifests:
            doc = json.loads(data)
            for d in [doc["config"], *doc.get("layers", [])]:
                seen.setdefault(d["digest"], Descriptor.from_json(d))
        return list(seen.values())

    def layers(self) -> list[Descriptor]:
        """Layers of the first manifest (the model's layers are the same in every platform's; a
        base's differ: see platform_layers)."""
        return self.platform_layers()[0][1]

    def platform_layers(self) -> list[tuple[Descriptor, list[Descriptor]]]:
        """Each manifest's descriptor (its platform) and its own layers, in the index's order."""
        return [
            (desc, [Descriptor.from_json(d) for d in json.loads(data).get("layers", [])])
            for desc, data in self.manifests
        ]


def media_type_of(doc: dict[str, Any]) -> str:
    """A manifest's media type as its own bytes say: they are covered by its digest, a registry's or
    a proxy's Content-Type is not (one that said application/json made an index look like a
    manifest, and a mirror left its platforms behind). Where OCI's optional field is absent, the
    document's shape tells."""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    return MEDIA_INDEX if "manifests" in doc else MEDIA_MANIFEST


def read_blob(store: Store, repo: str, blob: Descriptor) -> Generator[bytes, None, None]:
    """The bytes of a blob a manifest names, no more than its descriptor's size: a store (a
    registry, a proxy in front of one) that sends more is cut off at once, not read to the end
    (an endless body filled a layout's disk, or kept verify reading forever)."""
    count = 0
    for chunk in store.open_blob(repo, blob.digest):
        count += len(chunk)
        if count > blob.size:
            raise IntegrityError(f"{store}: blob {blob.digest}: more than its {blob.size} bytes: refused")
        yield chunk


def _document(data: bytes, kind: str) -> dict[str, Any]:
    """A manifest or an index as JSON, with every descriptor in it well-formed (ValueError): what
    reads it later takes its fields as they are."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError(f"the {kind} is no JSON object")
    for key in ("manifests", "layers"):
        if key in doc and not isinstance(doc[key], list):
            raise ValueError(f"the {kind}'s {key} is no list")
        for entry in doc.get(key) or []:
            Descriptor.from_json(entry)
    if "layers" in doc:
        Descriptor.from_json(doc.get("config"))
    return doc


def read_image(store: Store, repo: str, ref: str) -> StoredImage:
    """Read an image's root and manifests, checking each against the digest that names it, and
    that each is a manifest or an index (a broken registry's answer is named, not a traceback)."""
    data = store.get_manifest(repo, ref)
    digest = digest_of(data)
    if ref.startswith("sha256:") and digest != ref:
        raise IntegrityError(f"{store}: {repo}@{ref}: the stored bytes have digest {digest}")
    where = f"{store}: {repo}@{ref}"
    try:
        doc = _document(data, "image's root")
    except ValueError as exc:
        raise ModelcarError(f"{where}: not a valid manifest or index: {exc}") from None
    media_type = media_type_of(doc)
    if "manifests" in doc:

        def child(desc: Descriptor) -> tuple[Descriptor, bytes]:
            try:
                body = store.get_manifest(repo, desc.digest)
            except ModelcarError as exc:  # which of the index's images is gone, where it names one
                if not desc.platform:
                    raise
                raise said_of(exc, f"{where}: its {platform_name(desc.platform)} image") from exc
            if digest_of(body) != desc.digest or len(body) != desc.size:
                raise IntegrityError(f"{store}: {repo}: manifest {desc.digest} does not match its descriptor")
            try:
                manifest = _document(body, "manifest")
            except ValueError as exc:
                raise ModelcarError(f"{where}: manifest {desc.digest} is not valid: {exc}") from None
            if "manifests" in manifest:
                raise ModelcarError(f"{where}: {desc.digest} is an index in an index (not supported)")
            if "layers" not in manifest:
                raise ModelcarError(f"{where}: {desc.digest} is not an image manifest")
            return desc, body

        # One round trip for all platforms' manifests, not one each after another.
        descriptors = [Descriptor.from_json(entry) for entry in doc["manifests"]]
        if not descriptors:
            raise ModelcarError(f"{where}: an index of no image")
        with worker_pool(min(len(descriptors), LOOKUPS)) as pool:
            manifests = list(pool.map(child, descriptors))
        return StoredImage(repo, digest, media_type, data, manifests)
    if "layers" not in doc:
        raise ModelcarError(f"{where}: not an image manifest or index ({media_type})")
    return StoredImage(repo, digest, media_type, data, [(Descriptor(media_type, digest, len(data)), data)])
