"""Base images: what a model's layers go on top of, for serving modes that need a shell.

A base is read once per run, by digest, from any store; only its Linux platforms are built on
(an index's attestations and Windows images are not), and Docker layer types get their OCI names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from modelcar.errors import InputError, ModelcarError
from modelcar.image import ANN_LAYER_KEY, BasePlatform, Descriptor, digest_of, platform_name
from modelcar.stores import Store, read_blob, read_image
from modelcar.stores.registry_client import RegistryOptions
from modelcar.stores.spec import parse_image_ref


@dataclass(frozen=True)
class BaseImage:
    """A base image pinned by digest, read once per run: its platforms and where its blobs are."""

    ref: str
    store: Store
    repo: str
    platforms: list[BasePlatform]

    def only(self, platforms: Sequence[str] | None) -> BaseImage:
        """The base with just the platforms a catalog entry names (`OS/ARCH[/VARIANT]`, all when
        None), in the base's own order; a platform the base lacks is an error naming what it has."""
        if platforms is None:
            return self
        missing = [p for p in platforms if not any(b.runs_on(p) for b in self.platforms)]
        if missing:
            has = ", ".join(platform_name(b.platform) for b in self.platforms)
            raise ModelcarError(
                f"base {self.ref} has no {', '.join(missing)} (it has {has}): "
                "pick a base built for it, or take it out of `platforms:`"
            )
        return replace(self, platforms=[b for b in self.platforms if any(b.runs_on(p) for p in platforms)])

    def blobs(self) -> list[Descriptor]:
        seen: dict[str, Descriptor] = {}
        for p in self.platforms:
            for d in p.layers:
                seen.setdefault(d.digest, d)
        return list(seen.values())


# The layer types a base may have in the OCI manifests modelcar writes. A Docker-format base
# names the same bytes otherwise: its name is converted, the digest stays (as skopeo and crane
# convert); umoci refuses a Docker layer type inside an OCI manifest.
BASE_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
}


def _runnable(desc: Descriptor) -> bool:
    """Whether an index entry is a platform to build on: a Linux one. BuildKit puts its
    attestations (SBOM, provenance: in-toto JSON, no filesystem) in the index as platform
    unknown/unknown, and Docker Official Images carry them (built on, they became a broken
    `unknown/unknown` image); some have Windows platforms too, with foreign layers."""
    if desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
        return False
    return not desc.platform or (desc.platform.get("os") == "linux" and desc.platform.get("architecture") != "unknown")


def read_base(ref: str, options: RegistryOptions) -> BaseImage:
    """Read a base image (`HOST/REPO@sha256:...` or `oci:DIR:NAME@sha256:...`) and each platform's config."""
    image_ref = parse_image_ref(ref, options)
    try:
        return _read(ref, image_ref.store, image_ref.repo, image_ref.ref)
    except BaseException:
        image_ref.store.close(commit=False)  # the caller closes it, once it has it
        raise


def _read(ref: str, store: Store, repo: str, digest: str) -> BaseImage:
    if not digest.startswith("sha256:"):
        raise ModelcarError(f"base {ref!r}: pin it by digest (@sha256:...) so builds stay reproducible")
    image = read_image(store, repo, digest)
    platforms = []
    for desc, data in image.manifests:
        if not _runnable(desc):
            continue
        manifest = json.loads(data)
        config_desc = Descriptor.from_json(manifest["config"])
        config_bytes = b"".join(read_blob(store, repo, config_desc))
        if digest_of(config_bytes) != config_desc.digest:
            raise ModelcarError(f"base {ref}: config {config_desc.digest} does not match its bytes")
        config = json.loads(config_bytes)
        platform = desc.platform or {
            k: config[k] for k in ("os", "architecture", "variant") if isinstance(config.get(k), str)
        }
        layers = []
        for layer in map(Descriptor.from_json, manifest["layers"]):
            if ANN_LAYER_KEY in layer.annotations:
                # its layers put another model's files under /models, beside this one's: vLLM would
                # read them with it (a tokenizer this model lacks), and verify took them for damage
                raise InputError(
                    f"base {ref}: a modelcar image (layer {layer.digest} holds model files under /models): "
                    "pick a base with nothing under /models, a shell image"
                )
            if layer.media_type not in BASE_LAYER_TYPES:
                raise ModelcarError(
                    f"base {ref}: layer {layer.digest} is {layer.media_type}, not a filesystem layer "
                    f"({', '.join(sorted(set(BASE_LAYER_TYPES.values())))}): pick a base image that runs"
                )
            layers.append(replace(layer, media_type=BASE_LAYER_TYPES[layer.media_type]))
        platforms.append(BasePlatform(platform, config, tuple(layers)))
    if not platforms:
        raise ModelcarError(f"base {ref}: no Linux platform to build on (only attestations, or other systems)")
    return BaseImage(ref, store, repo, platforms)
