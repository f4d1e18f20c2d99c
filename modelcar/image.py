"""The modelcar image format (DESIGN.md section 5), as pure functions of the locked files.

Nothing here reads a file or talks to a store: layers are planned from the lock, and configs,
manifests and the index are built from layer descriptors, so the format can be tested exactly
and every digest is the same on any machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelcar.tarlayer import Entry, Member, TarParams, entries, layer_size

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"

LARGE_FILE = 16 * 1024 * 1024
HUB_PAGE = "https://huggingface.co"
DEFAULT_PLATFORMS: tuple[str, ...] = ("linux/amd64", "linux/arm64")

ANN_SOURCE = "org.opencontainers.image.source"
ANN_REVISION = "org.opencontainers.image.revision"
ANN_TITLE = "org.opencontainers.image.title"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_FILE_PATH = "dev.modelcar.file.path"
ANN_FILE_SHA256 = "dev.modelcar.file.sha256"
ANN_FILES = "dev.modelcar.files"
ANN_CONTENT = "dev.modelcar.content"
ANN_LAYER_KEY = "dev.modelcar.layer.key"
LAYER_FORMAT = "modelcar-layer-v1"  # bump when a layer's bytes change for the same members and params
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")  # what modelcar makes, and what a layout path holds
# Any digest the OCI image spec allows (another tool's sha512 in a shared layout), its registered
# algorithms checked to their lengths. No `/` or `..` in any: it may name a path or a URL.
_OCI_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_REGISTERED = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}


def is_digest(value: object) -> bool:
    """Whether `value` is a digest as the OCI image spec writes one."""
    match = _OCI_DIGEST_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return False
    encoded = _REGISTERED.get(match.group(1))
    return encoded is None or encoded.fullmatch(match.group(2)) is not None


def canonical_json(obj: Any) -> bytes:
    """The one serialization of a JSON document we write: its digest is what gets pinned."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Descriptor:
        """A descriptor as a manifest or an index holds it. What a registry or a layout sends is
        checked before it is used (a digest names a file in a layout): ValueError says what is
        wrong with it."""
        if not isinstance(data, dict):
            raise ValueError(f"a descriptor that is no object: {json.dumps(data)[:80]}")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        annotations, platform = data.get("annotations") or {}, data.get("platform") or None
        if not isinstance(media_type, str):
            raise ValueError(f"a descriptor without a mediaType: {json.dumps(data)[:80]}")
        if not isinstance(digest, str) or not is_digest(digest):
            raise ValueError(f"a descriptor whose digest is no digest: {json.dumps(digest)[:100]}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{digest}: size {json.dumps(size)[:40]} is not a byte count")
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise ValueError(f"{digest}: annotations that are not strings by name")
        if platform is not None and not isinstance(platform, dict):
            raise ValueError(f"{digest}: a platform that is no object")
        return cls(media_type, digest, size, dict(annotations), dict(platform) if platform else None)


@dataclass(frozen=True)
class LayerPlan:
    """One layer to be built: its members, tar entries, exact size and annotations."""

    members: tuple[Member, ...]
    entries: tuple[Entry, ...] = field(repr=False)  # tar headers: bytes no log of a result wants
    size: int
    annotations: dict[str, str]

    @property
    def description(self) -> str:
        if len(self.members) == 1:
            return self.members[0].path
        return f"{len(self.members)} small files"


def content_key(members: Sequence[Member]) -> str:
    """sha256 over (path, size, sha256) of the members: names a layer's content without its bytes."""
    h = hashlib.sha256()
    for m in sorted(members, key=lambda m: m.path):
        h.update(f"{m.path}\0{m.size}\0{m.sha256}\n".encode())
    return h.hexdigest()


def layer_key(members: Sequence[Member], params: TarParams) -> str:
    """Names a layer's bytes before they are made: format version, tar parameters, members.

    Recorded on every layer descriptor, so a later build finds the digest of a layer it would
    make again in the previous image's manifest, without reading a file.
    """
    return hashlib.sha256(f"{LAYER_FORMAT}\0{params.mtime}\0{content_key(members)}".encode()).hexdigest()


def _plan(members: Sequence[Member], params: TarParams) -> LayerPlan:
    ents = tuple(entries(members, params))
    if len(members) == 1:
        m = members[0]
        ann = {ANN_FILE_PATH: m.path, ANN_FILE_SHA256: m.sha256}
    else:
        ann = {ANN_FILES: str(len(members)), ANN_CONTENT: content_key(members)}
    ann[ANN_LAYER_KEY] = layer_key(members, params)
    return LayerPlan(tuple(sorted(members, key=lambda m: m.path)), ents, layer_size(ents), ann)


def plan_layers(members: Sequence[Member], params: TarParams, large_file: int = LARGE_FILE) -> list[LayerPlan]:
    """Small files together in one first layer, then one layer per large file, in path order.

    One layer per large file lets registries and nodes share and skip weight files one by one
    (a new revision that changes one shard uploads one shard); the small files, which change
    together (configs, tokenizer), travel as one.
    """
    if not members:
        raise ValueError("an image needs at least one file")
    ordered = sorted(members, key=lambda m: m.path)
    small = [m for m in ordered if m.size < large_file]
    large = [m for m in ordered if m.size >= large_file]
    plans = [_plan(small, params)] if small else []
    plans += [_plan([m], params) for m in large]
    return plans


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ImageMeta:
    """What the image says about where its files come from."""

    title: str
    source: str
    revision: str

    @classmethod
    def of(cls, title: str, source: str, commit: str) -> ImageMeta:
        """From a lock entry's source URI: `hf://ORG/NAME` becomes the repo's canonical Hub page
        (the same whatever mirror served the files), other sources stay as the lock has them."""
        kind, _, where = source.partition("://")
        return cls(title=title, source=f"{HUB_PAGE}/{where}" if kind == "hf" else source, revision=commit)

    def annotations(self) -> dict[str, str]:
        return {ANN_SOURCE: self.source, ANN_REVISION: self.revision, ANN_TITLE: self.title}


@dataclass(frozen=True)
class BuiltImage:
    """The JSON documents of an image; its layers are written separately."""

    index: bytes
    configs: list[bytes]  # one per platform: blobs
    manifests: list[bytes]  # one per platform: manifests, each naming its config and the layers

    @property
    def digest(self) -> str:
        return digest_of(self.index)


def _history_entry(plan: LayerPlan, created: str) -> dict[str, str]:
    return {"created": created, "created_by": f"modelcar: add {plan.description} to /models"}


@dataclass(frozen=True)
class BasePlatform:
    """One platform of a base image: where it runs, its parsed config and its layers."""

    platform: dict[str, str]
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]

    @classmethod
    def data_only(cls, platform: str) -> BasePlatform:
        """`OS/ARCH[/VARIANT]`, as the catalog's `platforms:` and `--platform` flags write it."""
        fields = platform_fields(platform)
        return cls(fields, {**fields, "config": {}}, ())

    def runs_on(self, platform: str) -> bool:
        """Whether this platform is `OS/ARCH[/VARIANT]`: a base's `linux/arm64/v8` is `linux/arm64`
        too (the variant is arm64's only one), but not `linux/arm64/v9`."""
        wanted = platform_fields(platform)
        return all(self.platform.get(k) == v for k, v in wanted.items())


def platform_fields(platform: str) -> dict[str, str]:
    """An OCI platform object from `OS/ARCH[/VARIANT]`."""
    names = ("os", "architecture", "variant")
    return dict(zip(names, platform.split("/"), strict=False))


def platform_name(platform: dict[str, Any]) -> str:
    """`OS/ARCH[/VARIANT]` of an OCI platform object, whatever order its keys come in."""
    return "/".join(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))


def build_image(
    layers: Sequence[tuple[LayerPlan, Descriptor]],
    meta: ImageMeta,
    params: TarParams,
    platforms: Sequence[str] | None = None,
    base: Sequence[BasePlatform] | None = None,
) -> BuiltImage:
    """Configs, per-platform manifests sharing the model layers, and the index that gets pinned.

    Without a base the image is data only, for `platforms` (DEFAULT_PLATFORMS when None); with
    one, the model layers go on top of the base's layers for each platform of the base (the
    caller picks them: `base.BaseImage.only`), keeping its config (the shell's PATH, user) and
    history. Uncompressed model layers: each diff_id is the layer digest itself.
    """
    created = rfc3339(params.mtime)
    layer_descs = [desc for _, desc in layers]
    ours = [_history_entry(plan, created) for plan, _ in layers]
    configs: list[bytes] = []
    manifests: list[bytes] = []
    index_entries = []
    targets = base if base is not None else [BasePlatform.data_only(p) for p in platforms or DEFAULT_PLATFORMS]
    for target in targets:
        doc = json.loads(json.dumps(target.config))  # a deep copy: the base's config is shared
        rootfs = doc.get("rootfs") or {}
        doc["created"] = created
        doc["rootfs"] = {"type": "layers", "diff_ids": [*rootfs.get("diff_ids", []), *(d.digest for d in layer_descs)]}
        doc["history"] = [*doc.get("history", []), *ours]
        config = canonical_json(doc)
        config_desc = Descriptor(MEDIA_CONFIG, digest_of(config), len(config))
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": config_desc.to_json(),
                "layers": [d.to_json() for d in (*target.layers, *layer_descs)],
                "annotations": meta.annotations(),
            }
        )
        configs.append(config)
        manifests.append(manifest)
        index_entries.append(
            Descriptor(MEDIA_MANIFEST, digest_of(manifest), len(manifest), platform=target.platform).to_json()
        )
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": index_entries,
            "annotations": meta.annotations(),
        }
    )
    return BuiltImage(index=index, configs=configs, manifests=manifests)
