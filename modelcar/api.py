"""modelcar as a library: each command's work as one typed function; the CLI parses, calls, prints.

    from modelcar import api

    api.lock("catalog.yaml")
    results = api.build("catalog.yaml", push=True)          # raises BuildFailed, with every result
    api.patch("catalog.yaml")

A catalog is a path or a loaded `Catalog`; how remote calls are made (retries, registry transport,
Hub concurrency) is one `Remote`. Failures raise `ModelcarError` subclasses whose message names the
file, the model and the field, with `exit_code` the CLI exits with. Nothing here prints: logs go
to the `modelcar` logger, progress bars only where a `Progress` is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelcar.catalog import Catalog, load_catalog
from modelcar.errors import InputError, ModelcarError, error_message
from modelcar.lock import Lock, read_lock
from modelcar.progress import Progress
from modelcar.retry import RetryPolicy
from modelcar.stores import DEFAULT_MAX_LAYER

if TYPE_CHECKING:
    from modelcar.build import ModelResult as ModelResult
    from modelcar.copy import CopyResult as CopyResult
    from modelcar.hfcache import Cached as Cached
    from modelcar.hub import Hub
    from modelcar.patch import PlannedFile as PlannedFile
    from modelcar.plan import PlanEntry as PlanEntry
    from modelcar.resolve import LockResult as LockResult
    from modelcar.stores import Store
    from modelcar.stores.layout import LayoutStore as LayoutStore
    from modelcar.stores.registry_client import RegistryOptions
    from modelcar.verify import Verified as Verified

# Imports stay inside the functions: the command line starts in a fraction of a second because
# each command loads only what it uses (httpx for registries, huggingface_hub for the Hub). The
# types the functions return are this module's names all the same (`api.ModelResult`), loaded
# when first asked for.
_RESULT_TYPES = {
    "ModelResult": "modelcar.build",
    "CopyResult": "modelcar.copy",
    "Cached": "modelcar.hfcache",
    "PlannedFile": "modelcar.patch",
    "PlanEntry": "modelcar.plan",
    "LockResult": "modelcar.resolve",
    "LayoutStore": "modelcar.stores.layout",
    "Verified": "modelcar.verify",
}


def __getattr__(name: str) -> Any:
    if name in _RESULT_TYPES:
        import importlib

        return getattr(importlib.import_module(_RESULT_TYPES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CatalogLike = Catalog | str | os.PathLike[str]
PathLike = str | os.PathLike[str]
Models = str | Sequence[str] | None  # model names of the catalog (one name alone too); None: all of them


def _names(models: Models) -> list[str] | None:
    """A name alone is one model, not its letters."""
    return None if models is None else [models] if isinstance(models, str) else list(models)


def _path(path: PathLike | None) -> Path | None:
    return None if path is None else Path(path)


@dataclass(frozen=True)
class Remote:
    """How remote calls are made, the same for the Hub and every registry a run talks to."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    insecure_registries: Sequence[str] = ()  # plain HTTP (loopback hosts always; MODELCAR_INSECURE_REGISTRIES too)
    ca_file: PathLike | None = None  # trusted besides the system CAs
    upload_chunk_size: int = 0  # 0: each blob in one request
    max_layer_size: int = DEFAULT_MAX_LAYER  # refused before any upload (0: no limit)
    hf_workers: int = 8  # Hub requests and downloads at once
    hf_large_workers: int = 2  # of those, weight files
    # the Hub, its cache and token for this Remote's calls only (None: huggingface_hub's HF_ENDPOINT,
    # HF_HUB_CACHE, HF_TOKEN or saved login, which are the process's)
    hf_endpoint: str | None = None
    hf_cache: PathLike | None = None
    hf_token: str | None = field(default=None, repr=False)
    # the registries' credentials for this Remote's calls only: a docker or podman auth file, the
    # only one read (None: REGISTRY_AUTH_FILE, DOCKER_CONFIG, ~/.docker, podman's, the process's)
    registry_auth_file: PathLike | None = None

    def registry_options(self) -> RegistryOptions:
        from modelcar.stores.registry_client import RegistryOptions

        return RegistryOptions.create(
            self.insecure_registries,
            _path(self.ca_file),
            self.upload_chunk_size,
            self.retry,
            self.max_layer_size,
            _path(self.registry_auth_file),
        )

    def hub(self) -> Callable[[], Hub]:
        """A Hub client made when first needed: a catalog of local models never asks for one."""
        from modelcar.hub import Hub

        return partial(
            Hub,
            self.retry,
            self.hf_workers,
            cache_dir=_path(self.hf_cache),
            large_workers=self.hf_large_workers,
            endpoint=self.hf_endpoint,
            token=self.hf_token,
        )


def load(catalog: CatalogLike) -> Catalog:
    """The catalog itself, or read and checked from its path (CatalogError names the file, the
    model and the field of whatever is wrong)."""
    return catalog if isinstance(catalog, Catalog) else load_catalog(Path(catalog))


def layout_store(catalog: CatalogLike, layout: PathLike | None = None) -> LayoutStore:
    """The OCI layout images are built into and read from: `layout`, or the catalog's default."""
    from modelcar.stores.layout import LayoutStore

    return LayoutStore(_path(layout) or load(catalog).default_layout)


def lock(
    catalog: CatalogLike, models: Models = None, *, update: bool = False, remote: Remote | None = None
) -> LockResult:
    """Pin each model to a commit and list its files in the lock; existing pins stay unless `update`
    (a local model whose files changed since is said to be, with what to run)."""
    from modelcar.local import say_if_moved
    from modelcar.resolve import lock_models

    cat, names = load(catalog), _names(models)
    result = lock_models(cat, names, update=update, hub=(remote or Remote()).hub())
    for spec in cat.select(names):
        if spec.path is not None and spec.name not in result.locked and (entry := result.lock.models.get(spec.name)):
            say_if_moved(cat, spec, entry)
    return result


def build(
    catalog: CatalogLike,
    models: Models = None,
    *,
    push: bool = False,
    registry: str | None = None,
    layout: PathLike | None = None,
    jobs: int = 4,
    update: bool = False,
    no_cache: bool = False,
    dry_run: bool = False,
    result_file: PathLike | None = None,
    remote: Remote | None = None,
    progress: Progress | None = None,
) -> list[ModelResult]:
    """Lock what needs it, fetch each snapshot once, build each image into the layout (or, with
    `push`, stream it to `registry`, default the catalog's) and record its digest in the lock.

    `result_file`: a CI worker's run of one model; its lock entry is written there for `merge`,
    and the lock is left as it is. A model that fails does not stop the others: BuildFailed then
    carries every model's result.
    """
    from modelcar.build import BuildFailed, build_models
    from modelcar.fsutil import can_create
    from modelcar.plan import write_result
    from modelcar.stores.registry import RegistryStore
    from modelcar.tarlayer import TarParams

    # worded as the command line says it: its options are these parameters
    if registry and not push:
        raise InputError("--registry needs --push (or use `modelcar push` after the build)")
    if layout and push:  # nothing goes to a layout then: said, not passed over
        raise InputError("--layout is where a build without --push writes; --push streams to the registry only")
    names, result = _names(models), _path(result_file)
    if result is not None and (dry_run or not names or len(names) != 1):
        raise InputError("--result writes one model's entry: use it with --index N (or one MODEL), not --dry-run")
    cat = load(catalog)
    if result is not None:  # a result that cannot be written is found now, not after the download and build
        cat.select(names)  # (an unknown model first: nothing made for it)
        can_create(result)
    remote = remote or Remote()
    options = remote.registry_options()
    store = RegistryStore(cat.registry_prefix(registry), options, write=True) if push else None
    with store or nullcontext():
        results = build_models(
            cat,
            names,
            update_lock=result is None,
            update=update,
            no_cache=no_cache,
            store=store,
            layout=_path(layout),
            jobs=jobs,
            dry_run=dry_run,
            registry_options=options,
            hub=remote.hub(),
            hf_cache=_path(remote.hf_cache),
            params=TarParams.from_env(),
            progress=progress,
        )
    if result is not None:
        (built,) = results
        assert built.entry is not None
        try:
            write_result(result, built.name, built.entry)
        except (ModelcarError, OSError) as exc:
            raise BuildFailed(error_message(exc), results) from exc
    return results


def push(
    catalog: CatalogLike,
    models: Models = None,
    *,
    registry: str | None = None,
    layout: PathLike | None = None,
    jobs: int = 4,
    remote: Remote | None = None,
    progress: Progress | None = None,
) -> list[CopyResult]:
    """Copy built images from the layout to `registry` (default the catalog's); record where they went."""
    from modelcar.copy import push_models
    from modelcar.stores.registry import RegistryStore

    cat = load(catalog)
    with RegistryStore(cat.registry_prefix(registry), (remote or Remote()).registry_options(), write=True) as store:
        return push_models(cat, _names(models), store, layout_store(cat, layout), jobs=jobs, progress=progress)


@contextmanager
def _source(source: str | None, options: RegistryOptions) -> Iterator[Store | None]:
    """The store `--from` names, read only, for the body of a `with`; None when none is named."""
    from modelcar.stores.spec import open_store

    src = open_store(source, options) if source else None
    try:
        yield src
    finally:
        if src is not None:
            src.close(commit=False)


def mirror(
    catalog: CatalogLike,
    to: str,
    models: Models = None,
    *,
    source: str | None = None,
    layout: PathLike | None = None,
    jobs: int = 4,
    remote: Remote | None = None,
    progress: Progress | None = None,
    no_cache: bool = False,
) -> list[CopyResult]:
    """Copy each locked image by digest into the store `to` names (`HOST/PATH`, `oci:DIR`,
    `oci-archive:FILE.tar`), from `source` or where the lock says it is. CopyFailed carries what
    was copied when some model failed. `no_cache`: what a layout or archive there holds is written
    again, not taken as what its names say (what mends one `verify --from` found damaged). An HF
    cache (`hf-cache:DIR` on the command line) holds files, not images: `mirror_to_hf_cache`."""
    from modelcar.copy import mirror_into

    cat = load(catalog)
    options = (remote or Remote()).registry_options()
    with _source(source, options) as src:
        return mirror_into(
            cat,
            _names(models),
            to,
            source=src,
            layout=layout_store(cat, layout),
            options=options,
            jobs=jobs,
            progress=progress,
            no_cache=no_cache,
        )


def mirror_to_hf_cache(
    catalog: CatalogLike,
    cache_dir: PathLike,
    models: Models = None,
    *,
    source: str | None = None,
    layout: PathLike | None = None,
    remote: Remote | None = None,
) -> list[Cached]:
    """Unpack each Hub model's locked image into an HF cache (for servers that load by repo id
    offline); each model's image digest, where it was read from and its snapshot directory."""
    from modelcar.hfcache import mirror_to_hf_cache as unpack

    cat = load(catalog)
    options = (remote or Remote()).registry_options()
    with _source(source, options) as src:
        return unpack(
            cat, _names(models), Path(cache_dir), source=src, layout=layout_store(cat, layout), options=options
        )


def verify(
    catalog: CatalogLike,
    models: Models = None,
    *,
    source: str | None = None,
    layout: PathLike | None = None,
    jobs: int = 4,
    remote: Remote | None = None,
    progress: Progress | None = None,
) -> dict[str, Verified]:
    """Read each locked image back and check every digest and every file against the lock; per
    model, where it was read and the problems found (none: intact)."""
    from modelcar.verify import verify_models

    cat = load(catalog)
    options = (remote or Remote()).registry_options()
    with _source(source, options) as src:
        return verify_models(
            cat,
            _names(models),
            source=src,
            layout=layout_store(cat, layout),
            options=options,
            jobs=jobs,
            progress=progress,
        )


def inspect(
    ref: str, *, catalog: CatalogLike = "catalog.yaml", layout: PathLike | None = None, remote: Remote | None = None
) -> dict[str, Any]:
    """An image's files, layers, sizes and annotations: a model of the catalog (its locked image,
    where verify would read it), or `oci:DIR:NAME`, `oci-archive:FILE:NAME`, `HOST/REPO[:TAG|@DIGEST]`."""
    from modelcar.describe import describe_image
    from modelcar.locate import Registries, locate
    from modelcar.stores.spec import parse_image_ref

    options = (remote or Remote()).registry_options()
    if any(c in ref for c in ":/@"):
        image = parse_image_ref(ref, options)
        with image.store:
            return describe_image(image.store, image.repo, image.ref)
    cat = load(catalog)
    with Registries(options) as registries:
        found = locate(
            cat, read_lock(cat.lock_file), ref, source=None, layout=layout_store(cat, layout), registries=registries
        )
        return describe_image(found.store, found.repo, found.digest)


@dataclass
class PatchResult:
    planned: list[PlannedFile]  # every patch and kustomization the catalog's overlays get
    changed: list[PlannedFile]  # those written, or removed (content None); with check, those out of step
    orphaned: list[Path]  # patches from this lock in overlays the catalog lists no more (not pruned)


def patch(
    catalog: CatalogLike,
    models: Models = None,
    *,
    check: bool = False,
    prune: bool = False,
    allow_unpushed: bool = False,
    registry: str | None = None,
) -> PatchResult:
    """Write the kustomize patches that pin each model's overlays to the lock's digests; with
    `check`, write nothing and say what is out of step. `prune` removes this lock's patches from
    overlays the catalog lists no more, and so works on the whole catalog. `registry`: pin each
    image as `REGISTRY/<model>@digest` (a mirror's, on an air-gapped side) instead of where the
    lock says it was pushed."""
    from modelcar.patch import patch_overlays

    names = _names(models)
    if prune and names:
        raise InputError("--prune works on the whole catalog (overlays no model lists): give no model names")
    planned, changed, orphaned = patch_overlays(
        load(catalog), names, allow_unpushed=allow_unpushed, check=check, prune=prune, registry=registry
    )
    return PatchResult(planned, changed, orphaned)


def plan(
    catalog: CatalogLike, *, changed_only: bool = False, registry: str | None = None, remote: Remote | None = None
) -> list[PlanEntry]:
    """The work list for CI fan-out, one model per worker; `changed_only`: only the models whose
    pinned image `registry` (default the catalog's) does not have yet, as the catalog asks for it."""
    from modelcar.plan import plan_entries

    cat = load(catalog)
    lock = read_lock(cat.lock_file)
    if not changed_only:
        return plan_entries(cat, lock)
    from modelcar.copy import image_there
    from modelcar.lock import image_tags
    from modelcar.stores import read_image
    from modelcar.stores.registry import RegistryStore

    specs = {spec.name: spec for spec in cat.models}
    with RegistryStore(cat.registry_prefix(registry), (remote or Remote()).registry_options()) as store:

        def has_image(model: str, digest: str) -> bool:
            # as a push asks it: every tag names it, and each platform's manifest and blob is there
            # (a registry's clean-up of untagged versions takes a platform's manifest from under
            # its index), the image read from the registry itself
            repo, tags = store.image_name(model), image_tags(specs[model], lock.models[model])
            return image_there(store, repo, digest, tags, lambda: read_image(store, repo, digest))

        return plan_entries(cat, lock, changed_only=True, has_image=has_image)


def merge(catalog: CatalogLike, results: Sequence[PathLike]) -> tuple[Lock, bool]:
    """Fold CI workers' result files into the lock; the lock and whether its file changed."""
    from modelcar.plan import merge_result_files

    paths = [results] if isinstance(results, str | os.PathLike) else results  # one file alone, not its letters
    return merge_result_files(load(catalog), [Path(p) for p in paths])


def containerfile(catalog: CatalogLike, model: str) -> str:
    """A Containerfile equivalent to the native build of one locked model (for buildah or Kaniko)."""
    from modelcar.containerfile import catalog_containerfile

    return catalog_containerfile(load(catalog), model)
