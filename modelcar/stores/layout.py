"""An OCI image layout directory as a store (image-spec `image-layout.md`).

Blobs are hashed while they are written, into a temp file next to their final place, and renamed
into `blobs/sha256/` only once their digest and size are checked: the layout never holds a blob
whose name is not its digest. `index.json` is replaced atomically under a lock, so concurrent
builds into one layout keep each other's entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcar.errors import BlobNotFound, DigestMismatch, IntegrityError, ModelcarError
from modelcar.fsutil import (
    create_beside,
    create_once,
    exclusive,
    file_writer,
    iter_file,
    link_below,
    naming,
    read_at_most,
    sweep_stale,
    write_if_changed,
)
from modelcar.image import ANN_REF_NAME, DIGEST_RE, MEDIA_INDEX, Descriptor, digest_of
from modelcar.stores import INDEX_MAX, MANIFEST_MAX, BlobSource, Store

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


def blob_hex(digest: str) -> str:
    """A blob's file name under blobs/sha256/: modelcar reads and writes sha256 blobs only (another
    tool's sha512 image in a shared layout is there, not for modelcar to read)."""
    if not DIGEST_RE.fullmatch(digest):
        raise ModelcarError(f"{digest[:100]!r}: modelcar reads sha256 blobs only")
    return digest.removeprefix("sha256:")


def ref_name(entry: dict[str, Any]) -> str | None:
    """The `org.opencontainers.image.ref.name` of an index.json entry."""
    return (entry.get("annotations") or {}).get(ANN_REF_NAME)


def with_ref(manifests: list[dict[str, Any]], ref: str, data: bytes, media_type: str) -> list[dict[str, Any]]:
    """index.json entries with `ref` naming these bytes: a rebuild replaces the model's entry."""
    entry = {"mediaType": media_type, "digest": digest_of(data), "size": len(data), "annotations": {ANN_REF_NAME: ref}}
    return [*(m for m in manifests if ref_name(m) != ref), entry]


def parse_index(data: bytes, where: str) -> dict[str, Any]:
    """A layout's (or an archive's) index.json, checked to be one: an object with a list of entries."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests") or [], list):
            raise ValueError("not an object with a list of manifests")
        for entry in doc.get("manifests") or []:
            Descriptor.from_json(entry)  # its digest names a file of the layout
        return doc
    except ValueError as exc:
        raise ModelcarError(f"{where}: not a valid OCI index ({exc})") from None


def index_doc(manifests: list[dict[str, Any]], was: dict[str, Any] | None = None) -> dict[str, Any]:
    """A layout's index: entries sorted by ref name, so the same images give the same bytes; what
    else the index it replaces had (its annotations, another tool's fields) is kept."""
    ordered = sorted(manifests, key=lambda m: (ref_name(m) or "", m["digest"]))
    return {**(was or {}), "schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": ordered}


def index_bytes(doc: dict[str, Any]) -> bytes:
    """Compact: json's indenting encoder is its Python one (3.4 ms a write at 800 images, once per
    model built into the layout); sorted keys, so the same images give the same bytes; ASCII, so
    what another tool's index said (an escaped lone surrogate is valid JSON) is written back."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def index_document(manifests: list[dict[str, Any]], was: dict[str, Any] | None = None) -> bytes:
    """index_doc's index.json."""
    return index_bytes(index_doc(manifests, was))


@dataclass(frozen=True)
class _Index:
    """A layout's index.json as read (empty: no file), its document and its named roots. Shared
    between lookups: not to be changed (with_ref and index_doc make new lists)."""

    data: bytes
    doc: dict[str, Any]
    names: dict[str, dict[str, Any]]  # ref name -> entry

    @classmethod
    def of(cls, data: bytes, doc: dict[str, Any]) -> _Index:
        entries = doc.get("manifests") or []
        return cls(data, doc, {name: m for m in entries if (name := ref_name(m)) is not None})


class LayoutStore(Store):
    """`rewrite`: a blob already there is not taken as a copy of what it is named for, but
    written again (once per store): what `build --no-cache` mends a damaged layout with."""

    blobs_shared = True

    def __init__(self, root: Path, *, rewrite: bool = False) -> None:
        self.root = Path(root)
        self.rewrite = rewrite
        self._written: set[str] = set()  # with `rewrite`: the blobs this store wrote
        self._swept = False
        self._index: _Index | None = None  # see _read

    def __str__(self) -> str:
        return f"oci:{self.root}"

    # --- layout structure -------------------------------------------------------------------

    def _sweep(self) -> None:
        """On the store's first use, reading or writing, the temporary files a killed run left go
        (a partial blob may be a weight file's size): also when this run writes nothing. Once per
        store: a listing of the blobs per blob would be quadratic."""
        if self._swept:
            return
        self._swept = True
        if link_below(self.root, self.root / "blobs" / "sha256") is not None:
            return  # nothing is deleted through a link (and nothing written: _init refuses it)
        for pattern in (".upload.*", ".upload-*"):  # the second: the name modelcar gave them before 5361e20
            sweep_stale(self.root / "blobs" / "sha256", pattern)  # on a read-only medium: left as it is
        for name in (LAYOUT_FILE, "index.json"):
            sweep_stale(self.root, f".{name}.*.tmp")

    def _init(self) -> None:
        blobs = self.root / "blobs" / "sha256"
        if (link := link_below(self.root, blobs)) is not None:
            # pointed elsewhere by whoever may write the layout, it took blobs of content a mirrored
            # image chooses, named by their digests, to any directory (as root: /etc/cron.d)
            raise IntegrityError(
                f"{link}: a symbolic link in an OCI layout, where a directory belongs: not written through "
                "(remove it; for a layout on another disk, give that directory as the layout)"
            )
        blobs.mkdir(parents=True, exist_ok=True)
        self._sweep()
        marker = self.root / LAYOUT_FILE
        if not marker.exists():
            create_once(marker, LAYOUT_VERSION)  # never replaced: writers lock it (see _locked)
        if not (self.root / "index.json").exists():
            with self._locked():
                if not (self.root / "index.json").exists():
                    self._write_index([])

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / blob_hex(digest)

    def _locked(self) -> AbstractContextManager[None]:
        return exclusive(self.root / LAYOUT_FILE)

    def _read(self) -> _Index:
        """index.json, parsed once per content: a build of 800 models into one layout parsed it for
        each model's lookups and tags, 2 ms each time; reading its bytes again to compare costs a
        tenth of that, and sees any other writer's version whatever its file's times."""
        path = self.root / "index.json"
        try:
            data = self._small(path, INDEX_MAX, "an index.json")
        except (FileNotFoundError, NotADirectoryError):  # no layout yet: the first write makes it
            return _Index.of(b"", {})
        index = self._index  # another thread may replace it meanwhile: a writer uses the one it checked
        if index is None or index.data != data:
            index = self._index = _Index.of(data, parse_index(data, str(path)))
        return index

    def _small(self, path: Path, cap: int, what: str) -> bytes:
        data = read_at_most(path, cap)
        if data is None:
            raise ModelcarError(f"{self}: {path.name}: larger than {cap} bytes: not {what}")
        return data

    def _write_index(self, manifests: list[dict[str, Any]], was: dict[str, Any] | None = None) -> None:
        """Under _locked: what is written is what the next read would parse."""
        doc = index_doc(manifests, was)
        data = index_bytes(doc)
        write_if_changed(self.root / "index.json", data)
        self._index = _Index.of(data, doc)

    def tags_for(self, model: str, tags: list[str]) -> list[str]:
        return [model]  # one entry per model in index.json, named by org.opencontainers.image.ref.name

    def refs(self) -> dict[str, dict[str, Any]]:
        """Named roots in this layout: ref name -> descriptor."""
        self._sweep()
        return dict(self._read().names)

    # --- Store ------------------------------------------------------------------------------

    def has_blob(self, repo: str, digest: str, size: int | None = None) -> bool:
        self._sweep()
        if self.rewrite and digest not in self._written:
            return False
        try:
            st = self.blob_path(digest).stat()
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    def put_blob(self, repo: str, size: int, source: BlobSource, digest: str | None = None) -> str:
        self._init()
        if digest is not None and self.has_blob(repo, digest, size):
            return digest
        blobs = self.root / "blobs" / "sha256"
        fd, tmp = create_beside(blobs / "upload")
        try:
            h = hashlib.sha256()
            written = 0
            out = file_writer(fd, blobs, size)
            try:
                for chunk in source():  # a read error of the source is the source's, not named here
                    h.update(chunk)
                    with naming(blobs):
                        out.write(chunk)
                    written += len(chunk)
                with naming(blobs):
                    out.sync()  # on disk before its name says it is complete
                    out.close()
            finally:
                if not out.closed:
                    with suppress(OSError):  # the temp file goes: the error to report is the one above
                        out.close()
            actual = "sha256:" + h.hexdigest()
            if written != size:
                raise IntegrityError(f"{self}: blob {actual}: expected {size} bytes, got {written}")
            if digest is not None and actual != digest:
                raise DigestMismatch(f"{self}: blob digest mismatch: expected {digest}, got {actual}")
            os.replace(tmp, self.blob_path(actual))
            if self.rewrite:
                self._written.add(actual)
            return actual
        finally:
            tmp.unlink(missing_ok=True)

    def open_blob(self, repo: str, digest: str) -> Iterator[bytes]:
        return iter_file(self._blob_file(digest))

    def blob_head(self, repo: str, digest: str, size: int) -> bytes:
        with self._blob_file(digest).open("rb") as f:
            return f.read(size)

    def _blob_file(self, digest: str) -> Path:
        self._sweep()
        path = self.blob_path(digest)
        if not path.is_file():
            raise BlobNotFound(f"{self}: blob {digest} not found")
        return path

    def put_manifest(self, repo: str, data: bytes, media_type: str, ref: str | None = None) -> str:
        digest = self.put_blob(repo, len(data), lambda: [data], digest_of(data))
        if ref is not None:
            with self._locked():
                was = self._read().doc
                self._write_index(with_ref(list(was.get("manifests") or []), ref, data, media_type), was)
        return digest

    def named_digest(self, repo: str, ref: str) -> str | None:
        if ref.startswith("sha256:"):
            return ref if self.blob_path(ref).is_file() else None
        self._sweep()
        entry = self._read().names.get(ref)
        return str(entry["digest"]) if entry is not None else None

    def get_manifest(self, repo: str, ref: str) -> bytes:
        self._sweep()
        digest = self.named_digest(repo, ref)
        if digest is None and ref.startswith("sha256:"):
            raise ModelcarError(f"{self}: manifest {ref} not found")
        if digest is None:
            raise ModelcarError(
                f"{self}: no image named {ref!r} (index.json has: {', '.join(sorted(self.refs())) or 'none'})"
            )
        return self._small(self.blob_path(digest), MANIFEST_MAX, "a manifest")
