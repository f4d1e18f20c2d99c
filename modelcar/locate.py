"""Where a model's locked image is: `--from`, the local layout, or the registry the lock records.

verify, inspect, mirror and the HF-cache mirror all read an image the lock pins; they find it the
same way, through one set of registry clients a run opens and closes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from modelcar.catalog import Catalog
from modelcar.errors import NotBuilt
from modelcar.lock import Lock, LockedModel, pinned_digest
from modelcar.stores import Store
from modelcar.stores.layout import LayoutStore
from modelcar.stores.registry import RegistryStore
from modelcar.stores.registry_client import RegistryOptions


def pinned(catalog: Catalog, lock: Lock, name: str) -> tuple[LockedModel, str]:
    """The lock entry of a model and the image digest it pins; an error when the catalog has no
    such model (exit 2, as for every command) or it was never built."""
    catalog.select([name])
    entry = lock.models.get(name)
    digest = pinned_digest(entry, name, catalog.lock_file)
    assert entry is not None
    return entry, digest


@dataclass(frozen=True)
class Located:
    entry: LockedModel
    digest: str
    store: Store
    repo: str


class Registries:
    """The registry clients a run opens to read images where the lock says they are: one per
    repository prefix (one credential lookup, one token per scope, its connections), all closed
    at the end."""

    def __init__(self, options: RegistryOptions) -> None:
        self.options = options
        self._open: dict[str, RegistryStore] = {}
        self._lock = threading.Lock()  # models are located from several threads (verify)

    def __getitem__(self, prefix: str) -> RegistryStore:
        with self._lock:
            if prefix not in self._open:
                self._open[prefix] = RegistryStore(prefix, self.options)
            return self._open[prefix]

    def __enter__(self) -> Registries:
        return self

    def __exit__(self, *exc: object) -> None:
        for store in self._open.values():
            store.close()
        self._open.clear()


def locate(
    catalog: Catalog,
    lock: Lock,
    name: str,
    *,
    source: Store | None,
    layout: LayoutStore,
    registries: Registries,
) -> Located:
    """Where to read a model's locked image: `source` (--from) when given, else the local layout
    when it holds the image, else the registry repository the lock records."""
    entry, digest = pinned(catalog, lock, name)
    if source is not None:
        repo = source.image_name(name)
        if not isinstance(source, RegistryStore) and not source.has_blob(repo, digest):
            # a file asked nothing over the network: said as what it is, not as a blob not found
            raise NotBuilt(
                f"{source}: does not hold {name}'s locked image {digest} (written before the lock's pin "
                f"moved?): `modelcar mirror {name} --to {source}` from where the image is, or pass the "
                "--from that holds it"
            )
        return Located(entry, digest, source, repo)
    if layout.has_blob(name, digest):
        return Located(entry, digest, layout, name)
    repository = entry.repository
    if repository:
        prefix, pushed_as = repository.rsplit("/", 1)  # the prefix the model was pushed under
        store = registries[prefix]
        return Located(entry, digest, store, store.image_name(pushed_as))
    raise NotBuilt(
        f"{name}: {digest} is neither in {layout} nor pushed anywhere the lock records: "
        "run `modelcar build` or pass --from"
    )
