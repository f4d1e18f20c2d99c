"""Layer digests remembered across runs, so a rebuild reads no file the store already has.

A layer's bytes are a function of its members (path, size, sha256), the tar parameters and the
format version, so those name the layer before it is read: with the digest known, a store
answers "have it" (HEAD) or mounts it, and the weights are never streamed again. An entry is
written only for a layer this machine made from files it checked, after a store accepted the
blob under that digest; what an earlier image's annotations claim is used for the run that read
it, and not written: a lock from an untrusted pull request, whose `earlier` image claims a layer
of someone else's bytes for the real files' key, must not decide what later builds on a shared
runner reuse. One small file per key keeps concurrent builds from stepping on each other.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from modelcar.errors import InputError
from modelcar.fsutil import NOTE_MODE, TEMPS, atomic_write_bytes, read_private, sweep_once
from modelcar.hub import hf_cache_dir
from modelcar.image import ANN_LAYER_KEY, Descriptor

log = logging.getLogger("modelcar")
# A layer key (image.layer_key) names a file here: what an image in a registry claims as one is
# taken only in this shape, so it cannot name a file outside the cache.
KEY_RE = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> Path:
    """`MODELCAR_CACHE`, else `modelcar/` beside the Hugging Face hub cache the files come from."""
    if env := os.environ.get("MODELCAR_CACHE"):
        return Path(env).expanduser()
    return hf_cache_dir().parent / "modelcar"


class LayerCache:
    """`trusted=False`: a cache whose files are written, never read (`build --no-cache`: entries
    are made anew from the layers as they are written). What this run learned or proved is kept
    in memory too: where the files cannot be written (a read-only cache, no home directory) the
    layers an earlier image in the store holds are still reused."""

    def __init__(self, root: Path | None = None, *, trusted: bool = True) -> None:
        self.base: Path | None = root
        if root is None:
            try:
                self.base = default_cache_dir()
            except InputError as exc:  # no home directory to put it under: the build goes on without
                log.warning("layer digests not remembered: %s (or MODELCAR_CACHE)", exc)
        self.root = self.base / "layers" if self.base is not None else Path()
        self.trusted = trusted and self.base is not None
        self._unwritable = self.base is None
        self._run: dict[str, tuple[str, int]] = {}  # what this run proved or learned

    def _file(self, key: str) -> Path:
        if not KEY_RE.fullmatch(key):
            raise ValueError(f"{key!r} is not a layer key")
        return self.root / key

    def get(self, key: str) -> tuple[str, int] | None:
        if key in self._run:
            return self._run[key]
        if not self.trusted:
            return None
        try:
            digest, size = read_private(self._file(key)).decode().split()
            return digest, int(size)
        except (OSError, ValueError):
            return None

    def digest(self, key: str, size: int) -> str | None:
        """The remembered digest of the layer named `key`, if it was remembered at this size."""
        hit = self.get(key)
        return hit[0] if hit is not None and hit[1] == size else None

    def put(self, key: str, digest: str, size: int) -> None:
        """Remember a layer's digest. The cache only saves reads: where it cannot be written (a
        read-only HF cache shared by CI runners, with the default cache beside it) the build goes
        on, and says so once."""
        known = self.get(key)
        self._run[key] = (digest, size)
        if self._unwritable or known == (digest, size):
            return
        try:
            sweep_once(self.root, TEMPS)
            atomic_write_bytes(self._file(key), f"{digest} {size}\n".encode(), mode=NOTE_MODE, sweep=False)
        except OSError as exc:
            self._unwritable = True
            log.warning(
                "%s: layer digests not remembered (%s): set MODELCAR_CACHE to a writable directory",
                self.root,
                exc.strerror or exc,
            )

    def learn(self, layers: Iterable[Descriptor]) -> int:
        """Take, for this run only, the layers of an image a store holds (their key annotations);
        return how many. Each run reads the earlier images again, so nothing is lost by not
        writing them down (see the module's docstring for why they are not).

        What an image's annotations claim is taken only where nothing is known yet: a digest this
        machine proved (written after a store accepted the layer) is not replaced by what some
        image in a registry says. An image that gives one layer two keys (or one key two
        layers) is no image of ours and teaches nothing."""
        keyed = [
            (key, layer) for layer in layers if (key := layer.annotations.get(ANN_LAYER_KEY)) and KEY_RE.fullmatch(key)
        ]
        if not len(keyed) == len({key for key, _ in keyed}) == len({layer.digest for _, layer in keyed}):
            return 0  # one blob under two keys, or one key for two blobs
        n = 0
        for key, layer in keyed:
            if self.get(key) is None:
                self._run[key] = (layer.digest, layer.size)
                n += 1
        return n
