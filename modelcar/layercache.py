"""Layer digests remembered across runs, so a rebuild reads no file the store already has.

A layer's bytes are a function of its members (path, size, sha256), the tar parameters and the
format version, so those name the layer before it is read: with the digest known, a store
answers "have it" (HEAD) or mounts it, and the weights are never streamed again. An entry is
written only after a store accepted the blob under that digest. One small file per key keeps
concurrent builds from stepping on each other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from modelcar.fsutil import atomic_write_bytes
from modelcar.image import LayerPlan, content_key
from modelcar.tarlayer import TarParams

FORMAT = "modelcar-layer-v1"


def default_cache_dir() -> Path:
    if env := os.environ.get("MODELCAR_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "modelcar"


def layer_key(plan: LayerPlan, params: TarParams) -> str:
    return hashlib.sha256(f"{FORMAT}\0{params.mtime}\0{content_key(plan.members)}".encode()).hexdigest()


class LayerCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()) / "layers"

    def get(self, key: str) -> tuple[str, int] | None:
        try:
            digest, size = (self.root / key).read_text().split()
            return digest, int(size)
        except (OSError, ValueError):
            return None

    def put(self, key: str, digest: str, size: int) -> None:
        if self.get(key) != (digest, size):
            atomic_write_bytes(self.root / key, f"{digest} {size}\n".encode())
