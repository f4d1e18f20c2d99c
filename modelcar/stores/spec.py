"""Store names as users type them (DESIGN.md section 2), turned into stores and image references.

  HOST[:PORT]/PATH          a registry repository prefix; a model's image is PREFIX/<model>
  oci:DIR                   an OCI image layout directory
  oci-archive:FILE.tar      the same, packed in one tar
For `inspect`, a single image: `oci:DIR:NAME`, `oci-archive:FILE:NAME`, `HOST/REPO[:TAG|@DIGEST]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from modelcar.auth import DOCKER_HUB_NAMES
from modelcar.errors import InputError
from modelcar.image import DIGEST_RE
from modelcar.stores import CREDENTIALS_IN_NAME, Store, has_credentials, registry_prefix_problem
from modelcar.stores.archive import ArchiveStore
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry import RegistryStore
from modelcar.stores.registry_client import RegistryOptions

LAYOUT = "oci:"
ARCHIVE = "oci-archive:"
HF_CACHE = "hf-cache:"  # not a store: a Hugging Face cache `mirror` unpacks images into


def _is_layout(path: Path) -> bool:
    return (path / "index.json").is_file()


def open_store(
    spec: str, options: RegistryOptions | None = None, *, write: bool = False, rewrite: bool = False
) -> Store:
    """The store `spec` names. `rewrite` (a layout or archive written to): each blob it holds is
    written again rather than taken as what its name says; a registry checks what it stores."""
    for prefix in (LAYOUT, ARCHIVE):
        if spec.startswith(prefix) and not spec[len(prefix) :].strip():
            raise InputError(f"{spec!r}: name the {'directory' if prefix == LAYOUT else 'file'}: {prefix}PATH")
    if spec.startswith(LAYOUT):
        path = Path(spec[len(LAYOUT) :])
        if not write and not _is_layout(path):
            raise InputError(f"{spec}: no OCI layout there (no index.json)")
        return LayoutStore(path, rewrite=rewrite)
    if spec.startswith(ARCHIVE):
        path = Path(spec[len(ARCHIVE) :])
        if not write and not path.exists():  # as a layout that is not there: the name is to fix
            raise InputError(f"{spec}: no such file")
        return ArchiveStore(path, write=write, rewrite=rewrite)
    if spec.startswith(HF_CACHE):
        raise InputError(
            f"{spec!r} holds files, not images: write it with `modelcar mirror --to {HF_CACHE}DIR` "
            "(in the library, modelcar.api.mirror_to_hf_cache)"
        )
    if spec.startswith(("/", "./", "../", "~")):  # a path, which names no registry
        raise InputError(
            f"{spec!r} is a path, not a store: oci:{spec} for an OCI layout, oci-archive:{spec} for an "
            f"archive (or, for `mirror --to`, {HF_CACHE}{spec} for a Hugging Face cache)"
        )
    if ":" in spec.split("/", 1)[0] or "/" in spec or spec == "localhost":
        return RegistryStore(spec, options, write=write)
    raise InputError(
        f"{spec!r} is not a store: use HOST[:PORT]/PATH (a registry prefix), oci:DIR or oci-archive:FILE.tar"
    )


@dataclass(frozen=True)
class ImageRef:
    store: Store
    repo: str
    ref: str  # a tag, a layout ref name, or a digest


def _check_digest(digest: str | None) -> None:
    # The reference itself is not repeated: what stands before an `@` may be someone's password.
    if digest is not None and not DIGEST_RE.fullmatch(digest):
        raise InputError(f"{digest!r} after @ is not a digest: sha256: and 64 lowercase hex digits")


def _split_location(prefix: str, rest: str) -> tuple[str, str]:
    """PATH and NAME of `PATH:NAME`. A name may hold colons (ctr and BuildKit name images
    `docker.io/library/x:latest`, as skopeo reads them), so the first split whose PATH is an
    existing layout (or archive) wins, the whole of it first (`oci:DIR@sha256:...`, DIR a
    timestamp with colons); else the last colon splits."""

    def exists(path: str) -> bool:
        return _is_layout(Path(path)) if prefix == LAYOUT else Path(path).is_file()

    if exists(rest):
        return rest, ""
    for i, c in enumerate(rest):
        if c == ":" and exists(rest[:i]):
            return rest[:i], rest[i + 1 :]
    location, sep, name = rest.rpartition(":")
    return (location, name) if sep else (rest, "")


def parse_image_ref(text: str, options: RegistryOptions | None = None) -> ImageRef:
    """One image: `oci:DIR:NAME`, `oci-archive:FILE:NAME` or `HOST/REPO[:TAG|@sha256:...]`."""
    for prefix in (LAYOUT, ARCHIVE):
        if text.startswith(prefix):
            rest, at, digest = text[len(prefix) :].partition("@")
            location, name = _split_location(prefix, rest)
            if not location or not (name or at):
                raise InputError(f"{text!r}: name the image: {prefix}PATH:NAME or {prefix}PATH@sha256:...")
            _check_digest(digest if at else None)
            return ImageRef(open_store(prefix + location, options), name, digest if at else name)
    if "/" not in text and re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", text):  # `busybox@sha256:...`
        # not repeated: what comes before the `@` might be a user:password all the same
        raise InputError("NAME@sha256:... names no registry: use HOST/REPO@sha256:... (docker.io/NAME for Docker Hub)")
    if has_credentials(text):
        raise InputError(CREDENTIALS_IN_NAME)
    host, _, rest = text.partition("/")
    if not rest:
        raise InputError(f"{text!r} is not an image reference: use HOST/REPO[:TAG|@DIGEST], oci:DIR:NAME")
    if "@" in rest:
        repo, ref = rest.split("@", 1)
        _check_digest(ref)
        if ":" in repo.rsplit("/", 1)[-1]:  # REPO:TAG@DIGEST: the digest names the image, as docker reads it
            repo = repo.rsplit(":", 1)[0]
    elif ":" in rest.rsplit("/", 1)[-1]:
        repo, ref = rest.rsplit(":", 1)
    else:
        repo, ref = rest, "latest"
    if host in DOCKER_HUB_NAMES and "/" not in repo:
        repo = f"library/{repo}"  # docker.io/busybox is library/busybox
    if (problem := registry_prefix_problem(f"{host}/{repo}")) is not None:
        raise InputError(f"{text!r}: {problem}")
    return ImageRef(RegistryStore(host, options, namespace=repo), repo, ref)
