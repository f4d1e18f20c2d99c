"""Stores: places images live.

A local OCI image layout and a registry are two implementations of one interface (the
go-containerregistry idea), so building, pushing, mirroring and verifying are all one copy
between two stores. `repo` is the image's name inside the store: the model name for a layout
(its `org.opencontainers.image.ref.name`), `PREFIX/<model>` for a registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator


class Store(ABC):
    """A place images live: content-addressed blobs plus named roots."""

    @abstractmethod
    def has_blob(self, repo: str, digest: str) -> bool:
        """Whether the store already holds the blob, so the caller can skip reading its source."""

    @abstractmethod
    def put_blob(self, repo: str, size: int, chunks: Iterable[bytes], digest: str | None = None) -> str:
        """Store a streamed blob of `size` bytes and return its digest.

        With `digest` given, the bytes are checked against it (and the caller may have skipped
        the upload by asking `has_blob` first); without it, the digest is computed on the way.
        A blob whose bytes or size do not match is never made visible.
        """

    @abstractmethod
    def open_blob(self, repo: str, digest: str) -> Iterator[bytes]:
        """The blob's bytes, streamed."""

    @abstractmethod
    def put_manifest(self, repo: str, data: bytes, media_type: str, ref: str | None = None) -> str:
        """Store a manifest or index as these exact bytes; with `ref`, also name it; return its digest."""

    @abstractmethod
    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        """The exact bytes and media type of a manifest or index, by name or digest."""
