"""kustomize patches that point vLLM at the exact image the lock pins (DESIGN.md section 10).

`modelcar patch` is `ko resolve` for model images: every overlay named in the catalog gets one
patch file, pinned by digest, and an entry in its kustomization.yaml. Strategic merge has traps
that render invalid pods silently (both sources on one volume, mounts of deleted volumes, whole
lists replaced), so each patch is computed from the overlay's base as it is, and written so that
kustomize's merge gives exactly the pod we mean. Output is deterministic: a second run changes
no byte, and `--check` tells CI when the overlays and the lock are out of step.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelcar.catalog import Catalog, ModelSpec, Overlay
from modelcar.errors import InputError, ModelcarError, NotBuilt, NotLocked, PatchError, all_of
from modelcar.fsutil import directories_locked, exclusive, shared, staged, sweep_temps
from modelcar.kustomize import (
    API_VERSIONS,
    KUSTOMIZATION_NAMES,
    ParsedYaml,
    argument_patches,
    base_objects,
    edit_kustomization,
    kustomization_file,
    remove_kustomization_entry,
)
from modelcar.lock import SCRATCH, LockedModel, not_servable, pinned_digest, read_lock
from modelcar.stores import registry_prefix_problem
from modelcar.vllm_args import check_command, edit_kserve_args, edit_vllm_args, takes_positional

log = logging.getLogger("modelcar")

VOLUME = "modelcar"
IMAGE_ROOT = "/mnt/modelcar"
SUBPATH_ROOT = "/mnt/models"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HEADER = "# Written by `modelcar patch` from {lock}: do not edit; change the catalog and run it again.\n"
# Every volume source of core/v1 Volume but `image` (1.33 and 1.35 have the same set): nulled
# when the base cannot be read, so a same-named base volume cannot keep a second source.
VOLUME_SOURCES = [
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "cephfs",
    "cinder",
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "fc",
    "flexVolume",
    "flocker",
    "gcePersistentDisk",
    "gitRepo",
    "glusterfs",
    "hostPath",
    "iscsi",
    "nfs",
    "persistentVolumeClaim",
    "photonPersistentDisk",
    "portworxVolume",
    "projected",
    "quobyte",
    "rbd",
    "scaleIO",
    "secret",
    "storageos",
    "vsphereVolume",
]


# Modes whose pods run a command in the modelcar image: a `base:` with a shell is needed.
SHELL_MODES = {
    "init-copy": "`cp`",
    "kserve": "KServe's modelcar sidecar (`sh -c 'ln -s ... /mnt/models && sleep infinity'`)",
}


# --- patch documents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchContext:
    model: ModelSpec
    entry: LockedModel
    overlay: Overlay
    where: str  # "catalog.yaml: models[0] (name): overlays[1] (path)", for messages
    reference: str  # REPOSITORY@sha256:...
    target: dict[str, Any] | None  # the base object, when the base could be read


def _pod_spec(target: dict[str, Any]) -> dict[str, Any]:
    return dict(((target.get("spec") or {}).get("template") or {}).get("spec") or {})


def _container(ctx: PatchContext, pod: dict[str, Any]) -> dict[str, Any] | None:
    if ctx.target is None:
        return None
    for c in pod.get("containers") or []:
        if c.get("name") == ctx.overlay.container:
            return dict(c)
    names = ", ".join(str(c.get("name")) for c in pod.get("containers") or []) or "none"
    raise PatchError(f"{ctx.where}: container: no container {ctx.overlay.container!r} in the target (it has: {names})")


def _base_args(ctx: PatchContext, args: Any, what: str) -> list[str]:
    """The argument list the patch edits: the catalog's `args:`, else the base's (`args`, None
    when the base cannot be read), which must be a list."""
    if ctx.overlay.args is not None:
        return list(ctx.overlay.args)
    if ctx.target is None:
        raise PatchError(
            f"{ctx.where}: args: the overlay's base cannot be read here (remote base or generator); "
            f"give the {what}'s full argument list as `args:` on this overlay"
        )
    if not isinstance(args, list | None):
        raise PatchError(f"{ctx.where}: the {what}'s args in the base are not a list ({str(args)[:60]!r})")
    return [str(a) for a in args or []]


def _env(container: dict[str, Any] | None) -> list[dict[str, Any]]:
    base = {e.get("name"): e for e in (container or {}).get("env") or []}
    out = []
    for name in OFFLINE_ENV:
        item: dict[str, Any] = {"name": name, "value": "1"}
        if container is None or "valueFrom" in base.get(name, {}):
            item["valueFrom"] = None  # else the merged entry has both value and valueFrom
        out.append(item)
    return out


def _mount_deletes(
    container: dict[str, Any], dropped: set[str], keep_path: str | None
) -> tuple[list[dict[str, Any]], bool]:
    """Deletes of a container's mounts of dropped volumes, keyed by mountPath (their merge key:
    deleting by name alone removes every mount); and whether one sits at `keep_path`, where the
    new mount replaces it instead (a delete and an add of one path cancel out)."""
    deletes = []
    collides = False
    for mount in container.get("volumeMounts") or []:
        if mount.get("name") in dropped:
            if mount.get("mountPath") == keep_path:
                collides = True
            else:
                deletes.append({"mountPath": mount.get("mountPath"), "$patch": "delete"})
    return deletes, collides


def _volume(ctx: PatchContext, pod: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The `modelcar` volume with exactly one source, whatever a same-named base volume had."""
    volume: dict[str, Any] = {"name": VOLUME}
    if ctx.target is None:
        others = [k for k in VOLUME_SOURCES if k not in source]
    else:
        existing: dict[str, Any] = next((v for v in pod.get("volumes") or [] if v.get("name") == VOLUME), {})
        others = sorted(k for k in existing if k != "name" and k not in source)
    volume.update({k: None for k in others})
    volume.update(source)
    return volume


def _under(value: str, root: str) -> bool:
    root = root.rstrip("/")
    return value == root or value.startswith(root + "/")


def _in_image(value: str, served: str, files: set[str]) -> bool:
    """Whether a path names the served directory, or a file or directory of the model in it."""
    if not _under(value, served):
        return False
    rel = value[len(served.rstrip("/")) :].strip("/")
    return not rel or rel in files or any(f.startswith(rel + "/") for f in files)


def _check_dropped_paths(
    ctx: PatchContext, args: list[str], container: dict[str, Any] | None, dropped: set[str], served: str
) -> None:
    """An argument left pointing into a dropped volume (`--tokenizer /models/x`, `--chat-template
    /models/x/t.jinja`) names a file the pod no longer has: vLLM would fail at start. The modelcar
    mount may take the volume's place: a path there is fine when the model's files have it."""
    files = {f.path for f in ctx.entry.files}
    for name, root in _dropped_mounts(container, dropped):
        for arg in args:
            value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
            if _under(value, root) and not _in_image(value, served, files):
                raise PatchError(
                    f"{ctx.where}: args: {arg!r} is under {root}, where the dropped volume {name!r} "
                    "was mounted: point it into the model image (the served path) or elsewhere, in the base or "
                    "in `args:` on this overlay"
                )


def _dropped_mounts(container: dict[str, Any] | None, dropped: set[str]) -> list[tuple[str, str]]:
    """Where a container mounted the volumes of `dropped`: (the volume's name, its mount path)."""
    return [
        (str(mount["name"]), str(mount["mountPath"]).rstrip("/"))
        for mount in (container or {}).get("volumeMounts") or []
        if mount.get("name") in dropped and mount.get("mountPath")
    ]


def _say_left_behind(
    ctx: PatchContext, pod: dict[str, Any], container: dict[str, Any] | None, dropped: set[str]
) -> None:
    """What a dropped volume leaves that a patch does not remove: the claim it was bound to (a
    resource of the overlay, maybe another pod's too), and the container's variables pointing into
    where it was mounted (HF_HOME=/models/.hf: a directory the pod no longer has). Said, not
    refused: the base is read as it is, so a fix in the overlay is not seen here."""
    for volume in pod.get("volumes") or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if volume.get("name") in dropped and claim:
            log.info(
                "%s: drop.volumes: %r claimed the PersistentVolumeClaim %r, which stays in the overlay's "
                "resources: delete it there if nothing else mounts it",
                ctx.where,
                volume["name"],
                claim,
            )
    for name, root in _dropped_mounts(container, dropped):
        for env in (container or {}).get("env") or []:
            if isinstance(env.get("value"), str) and _under(env["value"], root):
                log.info(
                    "%s: env %s=%s is under %s, where the dropped volume %r was mounted: the pod no longer "
                    "has it (set it elsewhere, or unset it, in the base)",
                    ctx.where,
                    env.get("name"),
                    env["value"],
                    root,
                    name,
                )


def _workload_patch(ctx: PatchContext, mode: str) -> dict[str, Any]:
    pod = _pod_spec(ctx.target) if ctx.target else {}
    container = _container(ctx, pod)
    drop = ctx.overlay.drop
    dropped_volumes = set(drop.volumes) if drop else set()
    dropped_inits = list(drop.initContainers) if drop else []
    check_command(ctx.where, container)
    base_args = _base_args(ctx, (container or {}).get("args"), "container")
    if ctx.target is None and dropped_volumes:
        raise PatchError(
            f"{ctx.where}: drop.volumes: the overlay's base cannot be read here (remote base or generator), so "
            f"the mounts of {', '.join(sorted(dropped_volumes))} cannot be found to remove with the volumes: "
            "vendor the base into the repository, or remove those volumes and their mounts in a patch of your own"
        )
    if ctx.target is not None:
        known_volumes = {v.get("name") for v in pod.get("volumes") or []}
        known_inits = {c.get("name") for c in pod.get("initContainers") or []}
        for name in sorted(dropped_volumes - known_volumes):
            raise PatchError(f"{ctx.where}: drop.volumes: the target has no volume {name!r}")
        for name in dropped_inits:
            if name not in known_inits:
                raise PatchError(f"{ctx.where}: drop.initContainers: the target has no init container {name!r}")
        _say_left_behind(ctx, pod, container, dropped_volumes)

    if mode == "image-volume" and ctx.overlay.subPath:
        mount: dict[str, Any] = {"name": VOLUME, "mountPath": SUBPATH_ROOT, "subPath": "models", "readOnly": True}
        served = SUBPATH_ROOT
        source: dict[str, Any] = {"image": {"reference": ctx.reference, "pullPolicy": "IfNotPresent"}}
    elif mode == "image-volume":
        mount = {"name": VOLUME, "mountPath": IMAGE_ROOT, "readOnly": True}
        served = f"{IMAGE_ROOT}/models"
        source = {"image": {"reference": ctx.reference, "pullPolicy": "IfNotPresent"}}
    else:  # init-copy
        mount = {"name": VOLUME, "mountPath": SUBPATH_ROOT, "readOnly": True}
        served = SUBPATH_ROOT
        gib = max(1, math.ceil(ctx.entry.total_bytes * 1.1 / (1 << 30)))
        source = {"emptyDir": {"sizeLimit": f"{gib}Gi"}}

    # A base volume named like ours is replaced (see _volume): its mounts go with it, as a dropped
    # volume's do (left, a writable cache dir would become the read-only image).
    unmounted = dropped_volumes | {VOLUME}
    try:
        args = edit_vllm_args(base_args, served, ctx.model.served_name, positional=takes_positional(container))
    except PatchError as exc:  # which overlay's container
        raise PatchError(f"{ctx.where}: args: {exc}") from None
    _check_dropped_paths(ctx, args, container, unmounted, served)
    main: dict[str, Any] = {
        "name": ctx.overlay.container,
        "args": args,
        "env": _env(container),
    }
    deletes, collides = _mount_deletes(container or {}, unmounted, mount["mountPath"])
    if collides:
        mount = {**mount, "subPath": mount.get("subPath"), "subPathExpr": None}
    main["volumeMounts"] = [*deletes, mount]

    containers = [main]
    for other in pod.get("containers") or []:
        if other.get("name") != ctx.overlay.container:
            other_deletes, _ = _mount_deletes(other, unmounted, None)
            if other_deletes:
                containers.append({"name": other.get("name"), "volumeMounts": other_deletes})

    inits: list[dict[str, Any]] = [{"name": n, "$patch": "delete"} for n in dropped_inits]
    if mode == "init-copy":
        inits.append(
            {
                "name": VOLUME,
                "image": ctx.reference,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", f"cp -r /models/. {SUBPATH_ROOT}/"],
                "volumeMounts": [{"name": VOLUME, "mountPath": SUBPATH_ROOT}],
            }
        )
    for init in pod.get("initContainers") or []:
        if init.get("name") not in dropped_inits:
            init_deletes, _ = _mount_deletes(init, unmounted, None)
            if init_deletes:
                inits.append({"name": init.get("name"), "volumeMounts": init_deletes})

    spec: dict[str, Any] = {}
    if inits:
        spec["initContainers"] = inits
    spec["containers"] = containers
    spec["volumes"] = [{"name": n, "$patch": "delete"} for n in sorted(dropped_volumes)] + [_volume(ctx, pod, source)]
    return _document(ctx, {"template": {"spec": spec}})


def _kserve_patch(ctx: PatchContext) -> dict[str, Any]:
    model = ((ctx.target or {}).get("spec") or {}).get("predictor", {}).get("model") if ctx.target else None
    if ctx.target is not None and not isinstance(model, dict):
        raise PatchError(f"{ctx.where}: target: the InferenceService has no spec.predictor.model (the model form)")
    base_args = _base_args(ctx, (model or {}).get("args"), "predictor model")
    predictor_model: dict[str, Any] = {
        "storageUri": f"oci://{ctx.reference}",
        # lists are replaced whole on a custom resource: the patch carries the full argument list
        "args": edit_kserve_args(base_args, ctx.model.served_name),
    }
    if model is not None:  # and the full variable list, the base's with the offline ones (unread: left alone)
        kept = [e for e in model.get("env") or [] if isinstance(e, dict) and e.get("name") not in OFFLINE_ENV]
        predictor_model["env"] = [*kept, *({"name": name, "value": "1"} for name in OFFLINE_ENV)]
    return _document(ctx, {"predictor": {"model": predictor_model}})


def _document(ctx: PatchContext, spec: dict[str, Any]) -> dict[str, Any]:
    kind = ctx.overlay.target.kind
    api = (ctx.target or {}).get("apiVersion") or API_VERSIONS[kind]
    return {"apiVersion": api, "kind": kind, "metadata": {"name": ctx.overlay.target.name}, "spec": spec}


def render_patch(ctx: PatchContext) -> str:
    mode = ctx.overlay.mode
    if mode == "kserve":
        if ctx.overlay.target.kind != "InferenceService":
            raise PatchError(
                f"{ctx.where}: target.kind: kserve patches a KServe InferenceService, not a {ctx.overlay.target.kind}"
            )
        doc = _kserve_patch(ctx)
    else:
        if ctx.overlay.target.kind not in ("Deployment", "StatefulSet"):
            raise PatchError(
                f"{ctx.where}: target.kind: {mode} patches a Deployment or StatefulSet pod template, "
                f"not a {ctx.overlay.target.kind}"
            )
        doc = _workload_patch(ctx, mode)
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1 << 16, allow_unicode=True)


# --- the command ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    path: Path
    content: str | None = field(repr=False)  # None: the file goes (a model or target the catalog no longer has)
    # the same patch under the header of a release before headers named the lock's path: stale all
    # the same (the header tells two catalogs' patches in one overlay apart), but only in a comment
    legacy: str | None = field(default=None, repr=False)

    def is_current(self) -> bool:
        if self.content is None:
            return not self.path.exists()
        return self.path.is_file() and self.path.read_bytes() == self.content.encode()

    def header_only(self) -> bool:
        """Whether the file differs from what `patch` writes in its header alone, which an older
        release wrote: nothing a cluster sees would change."""
        return self.legacy is not None and self.path.is_file() and self.path.read_bytes() == self.legacy.encode()


def _header(catalog: Catalog, directory: Path) -> str:
    """A patch file's first line: it names the lock it was written from, by its path from the
    overlay, so two catalogs that patch one overlay (each with a catalog.lock) tell theirs apart."""
    lock = Path(os.path.relpath(catalog.lock_file.resolve(), directory)).as_posix()
    return HEADER.format(lock=lock)


def _ours(found: str, header: str, catalog: Catalog, directory: Path) -> bool:
    """Whether a patch file with header `found`, in `directory`, is this catalog's to replace or
    remove: written from its lock (by path, or by name alone as before headers named the path),
    or from a lock that is no longer there (the catalog moved, or went away)."""
    if found in (header, HEADER.format(lock=catalog.lock_file.name)):
        return True
    lock = found.removeprefix(HEADER.split("{", 1)[0]).split(": do not edit", 1)[0]
    return not (directory / lock).exists()


def _written_from(path: Path) -> str | None:
    """The header of a patch file modelcar wrote (line endings aside: git may have made them CRLF),
    None for any other file."""
    try:
        with path.open("rb") as f:
            first = f.readline().decode(errors="replace").rstrip("\r\n") + "\n"
    except OSError:
        return None
    return first if first.startswith(HEADER.split("{", 1)[0]) else None


def _left_behind(catalog: Catalog, directory: Path, planned: set[Path]) -> list[Path]:
    """This catalog's own patch files in an overlay (see `_ours`) that no model of the catalog
    writes any more: a model renamed or given another target, an overlay handed to another model.
    Left, they would keep pinning the old image (or clash with the new patch). Another catalog's
    patches in a shared overlay name another lock, which is there: they stay."""
    header = _header(catalog, directory)
    return [
        path
        for path in sorted(directory.glob("modelcar-*.yaml"))
        if path not in planned
        and path.is_file()
        and (found := _written_from(path)) is not None
        and _ours(found, header, catalog, directory)
    ]


def _image_roots(catalog: Catalog, registry: str | None) -> tuple[str, ...]:
    """How a patch of this catalog names its image: under the catalog's registry (or the one
    patches are pinned to), or at a repository its lock records."""
    lock = read_lock(catalog.lock_file)
    repositories = [e.image.repository for e in lock.models.values() if e.image and e.image.repository]
    prefixes = {p for p in (catalog.registry, registry) if p}
    return (*sorted(f"{p}/" for p in prefixes), *(f"{r}@" for r in repositories))


def orphaned_patches(catalog: Catalog, registry: str | None = None) -> dict[Path, list[Path]]:
    """Patch files written from this catalog's lock in overlays it lists no more, by overlay: a
    model removed, an overlay taken off a model (or a copy of a patched overlay). Nothing updates
    them: they go on pinning the image they were written for. Looked for under the catalog's
    directory and beside each overlay it lists (dot directories, .git, passed over); only beside a
    kustomization (what `--prune` edits), and only a file whose header names this very lock and
    that pins an image of this catalog: a header names its lock by a relative path, which a copy at
    another depth makes name another catalog's lock."""
    if not catalog.lock_file.exists():
        return {}
    listed = {(catalog.root / o.path).resolve() for m in catalog.models for o in m.overlays}
    image_roots = _image_roots(catalog, registry)

    def orphaned(path: Path, header: str) -> bool:
        if not path.is_file() or _written_from(path) != header:
            return False
        text = path.read_text(errors="replace")
        return any(root in text for root in image_roots)

    walk_roots = sorted({catalog.root.resolve(), *(d.parent for d in listed)})
    walk_roots = [r for r in walk_roots if not any(r != o and r.is_relative_to(o) for o in walk_roots)]
    found: dict[Path, list[Path]] = {}
    for walk_root in walk_roots:
        for where, dirs, names in os.walk(walk_root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            directory = Path(where)
            if directory in listed or not any(n.startswith("modelcar-") and n.endswith(".yaml") for n in names):
                continue
            if kustomization_file(directory) is None:
                continue
            header = _header(catalog, directory)
            if paths := [p for p in sorted(directory.glob("modelcar-*.yaml")) if orphaned(p, header)]:
                found[directory] = paths
    return dict(sorted(found.items()))


def _overlay_where(index: int, spec: ModelSpec, o_index: int, overlay: Overlay) -> str:
    return f"models[{index}] ({spec.name}): overlays[{o_index}] ({overlay.path})"


def _patch_files(catalog: Catalog) -> dict[str, list[Path]]:
    """Each model's patch file per overlay, for every model of the catalog (written this run or
    another); two that would write the same file are refused (`modelcar-t-deployment-x.yaml` of
    model t, and of model t-deployment-x)."""
    out: dict[str, list[Path]] = {}
    writers: dict[Path, str] = {}
    workloads: dict[tuple[Path, str, str], str] = {}
    for index, spec in enumerate(catalog.models):
        out[spec.name] = []
        for o_index, (overlay, path) in enumerate(
            zip(spec.overlays, _model_patch_files(catalog, index, spec), strict=True)
        ):
            where = _overlay_where(index, spec, o_index, overlay)
            if path in writers:
                raise PatchError(
                    f"{catalog.file}: {where}: writes the same patch file ({path.name}) as {writers[path]}: "
                    "rename one of the models"
                )
            # One pod serves one model: a second patch of it (its `modelcar` volume, its args) would
            # replace the first in the rendered overlay, the one kustomize applies last winning.
            workload = (path.parent, overlay.target.kind, overlay.target.name)
            if workload in workloads:
                raise PatchError(
                    f"{catalog.file}: {where}: target: {overlay.target.kind} {overlay.target.name!r} of this overlay "
                    f"is patched by {workloads[workload]} too, and one workload serves one model: give each model "
                    "its own overlay or target"
                )
            workloads[workload] = where
            writers[path] = where
            out[spec.name].append(path)
    return out


def _built_as(base: str | None, platforms: list[str] | None) -> str:
    if base is None:  # a lock from before bases and platforms were recorded
        return "on a base and for platforms it does not record"
    return f"on {base}" + (f" for {', '.join(platforms)}" if platforms else " for the default platforms")


def _reference(catalog: Catalog, name: str, entry: LockedModel, allow_unpushed: bool, registry: str | None) -> str:
    """The image a model's patches pin: by the lock's digest, in `registry` when given (a mirror
    of the registry it was pushed to: the digest is the same there), else where it was pushed."""
    digest = pinned_digest(entry, name, catalog.lock_file)
    assert entry.image is not None
    if registry is not None:
        return f"{registry}/{name}@{digest}"
    if entry.image.repository:
        return f"{entry.image.repository}@{digest}"
    if allow_unpushed and catalog.registry:
        log.warning(
            "%s: built but not pushed: pinning %s/%s@%s, the digest it will have once pushed",
            name,
            catalog.registry,
            name,
            digest,
        )
        return f"{catalog.registry}/{name}@{digest}"
    if not catalog.registry:  # neither a pushed image nor a registry to name one in
        raise InputError(
            f"{catalog.lock_file}: {name}: built but not pushed, and {catalog.file} has no `registry:` to pin it "
            f"in: set one and run `modelcar push {name}` (or pin the digest it will have there with "
            "--allow-unpushed), or pass --registry PREFIX"
        )
    raise ModelcarError(
        f"{catalog.lock_file}: {name}: built but not pushed, so no repository to pin: run "
        f"`modelcar push {name}`, or pass --allow-unpushed to pin `{catalog.registry}/{name}` with the lock's digest"
    )


def _model_patch_files(catalog: Catalog, index: int, spec: ModelSpec) -> list[Path]:
    """Each overlay's patch file: `modelcar-MODEL.yaml`, or with the target's kind and name when
    the model patches more than one workload in that overlay (each needs its own file)."""
    dirs = [(catalog.root / o.path).resolve() for o in spec.overlays]
    paths = []
    for o_index, (overlay, directory) in enumerate(zip(spec.overlays, dirs, strict=True)):
        same = [o for o, d in zip(spec.overlays, dirs, strict=True) if d == directory]
        if sum(o.target == overlay.target for o in same) > 1:
            raise PatchError(
                f"{catalog.file}: {_overlay_where(index, spec, o_index, overlay)}: target: "
                f"{overlay.target.kind} {overlay.target.name!r} in this overlay is listed twice for this model"
            )
        target = f"-{overlay.target.kind.lower()}-{overlay.target.name}" if len(same) > 1 else ""
        paths.append(directory / f"modelcar-{spec.name}{target}.yaml")
    return paths


def plan_patches(
    catalog: Catalog,
    names: list[str] | None = None,
    *,
    allow_unpushed: bool = False,
    prune: bool = False,
    registry: str | None = None,
) -> list[PlannedFile]:
    """Every file `modelcar patch` would write, with its content; nothing is written. With
    `prune` (the whole catalog), the patches `orphaned_patches` finds are removed too. With
    `registry`, every image is pinned in that registry prefix instead of where the lock says it
    was pushed (an air-gapped side's mirror)."""
    if registry is not None and (problem := registry_prefix_problem(registry)):
        raise InputError(f"--registry: {problem}")
    lock = read_lock(catalog.lock_file)
    files: dict[Path, str | None] = {}
    legacy: dict[Path, str] = {}  # see PlannedFile.legacy
    selected = {m.name for m in catalog.select(names)}  # an unknown name is an error, not a silent no-op
    patch_files = _patch_files(catalog)
    every = {path for paths in patch_files.values() for path in paths}
    gone: set[Path] = set()
    parsed = ParsedYaml()
    listed = {(catalog.root / o.path).resolve() for m in catalog.select(names) for o in m.overlays}
    orphans = orphaned_patches(catalog, registry) if names is None and prune else {}
    for directory in sorted(listed | set(orphans)):
        kfile = kustomization_file(directory) if directory.is_dir() else None
        if kfile is None:
            continue  # said below, for the overlay that names it
        for path in orphans[directory] if directory in orphans else _left_behind(catalog, directory, every):
            gone.add(path)
            files[path] = None
            try:
                files[kfile] = remove_kustomization_entry(files.get(kfile) or kfile.read_bytes().decode(), path.name)
            except PatchError as exc:
                raise PatchError(f"{kfile}: {exc}") from None

    def plan_model(index: int, spec: ModelSpec) -> None:
        for o_index, overlay in enumerate(spec.overlays):  # the catalog's to fix first: a build would not help
            if overlay.mode in SHELL_MODES and not spec.base:
                raise PatchError(
                    f"{catalog.file}: {_overlay_where(index, spec, o_index, overlay)}: mode: {overlay.mode} runs "
                    f"{SHELL_MODES[overlay.mode]} in the modelcar image, which needs a shell: set `base:` on the "
                    "model (e.g. the busybox base in containerfiles/busybox-base) and build again"
                )
        entry = lock.models.get(spec.name)
        if entry is None:
            raise NotLocked(f"{catalog.lock_file}: {spec.name} is not locked: run `modelcar build {spec.name}`")
        if entry.image is not None and not_servable(entry.image, spec):
            raise NotBuilt(
                f"{catalog.lock_file}: {spec.name}: the image in the lock is built "
                f"{_built_as(entry.image.base, entry.image.platforms)}, {catalog.file} asks for one "
                f"{_built_as(spec.base or SCRATCH, spec.platforms)}: run `modelcar build {spec.name}` first"
            )
        reference = _reference(catalog, spec.name, entry, allow_unpushed, registry)
        paths = patch_files[spec.name]
        for o_index, overlay in enumerate(spec.overlays):
            where = f"{catalog.file}: {_overlay_where(index, spec, o_index, overlay)}"
            directory = (catalog.root / overlay.path).resolve()
            if not directory.is_dir():
                raise PatchError(f"{where}: path: {directory} is not a directory")
            kfile = kustomization_file(directory)
            if kfile is None:
                raise PatchError(f"{where}: path: no kustomization.yaml in {directory}")
            objects = base_objects(directory, parsed)
            target = None
            if objects is None:
                log.warning("%s: the overlay's base cannot be read here; using `args:` from the catalog", where)
            else:
                target = next(
                    (
                        o
                        for o in objects
                        if o.get("kind") == overlay.target.kind
                        and (o.get("metadata") or {}).get("name") == overlay.target.name
                    ),
                    None,
                )
                if target is None:
                    raise PatchError(
                        f"{where}: target: no {overlay.target.kind} named {overlay.target.name!r} in the overlay's base"
                    )
            patch_name = paths[o_index].name
            if overlay.args is None:
                ours = frozenset(path for o, path in zip(spec.overlays, paths, strict=True) if o.args is None)
                ours |= gone
                if patched := argument_patches(directory, overlay.target, overlay.container, ours, parsed):
                    raise PatchError(
                        f"{where}: {patched[0]}: a patch there sets the args or command of {overlay.target.kind} "
                        f"{overlay.target.name!r}, which "
                        "modelcar's patch would silently replace: give the container's full argument list as "
                        "`args:` on this overlay in the catalog, and drop that patch"
                    )
            ctx = PatchContext(spec, entry, overlay, where, reference, target)
            header = _header(catalog, directory)
            found = _written_from(directory / patch_name)
            if found is not None and not _ours(found, header, catalog, directory):
                raise PatchError(
                    f"{where}: {directory / patch_name} was written from another lock ({found.strip()}): "
                    "two catalogs patch this overlay with a model of the same name: rename one of them"
                )
            body = render_patch(ctx)
            files[directory / patch_name] = header + body
            if header != (older := HEADER.format(lock=catalog.lock_file.name)):
                legacy[directory / patch_name] = older + body
            current = files.get(kfile) or kfile.read_bytes().decode()  # as it is: CRLF files stay CRLF
            try:
                files[kfile] = edit_kustomization(current, patch_name, overlay)
            except PatchError as exc:
                raise PatchError(f"{kfile}: {exc}") from None

    failures: list[ModelcarError] = []
    for index, spec in enumerate(catalog.models):
        if spec.name not in selected or not spec.overlays:
            continue
        try:
            plan_model(index, spec)
        except ModelcarError as exc:  # every model it cannot pin is named, not the first only
            failures.append(exc)
    if failures:
        raise all_of(failures)
    return [PlannedFile(path, content, legacy.get(path)) for path, content in sorted(files.items())]


def stale_files(planned: list[PlannedFile]) -> Iterator[PlannedFile]:
    return (f for f in planned if not f.is_current())


def patch_overlays(
    catalog: Catalog,
    names: list[str] | None = None,
    *,
    allow_unpushed: bool = False,
    check: bool = False,
    prune: bool = False,
    registry: str | None = None,
) -> tuple[list[PlannedFile], list[PlannedFile], list[Path]]:
    """Plan every patch and write what changed (with `check`, write nothing); (planned, changed,
    orphaned). Patching the whole catalog, the orphaned patches (`orphaned_patches`) are removed
    with `prune`, and named otherwise: they may be a copy someone made on purpose.

    Under the catalog's lock, as lock writes are: two runs at once (one per model, from a CI
    matrix) each read a kustomization.yaml and write it back, and the last would drop the other's
    entry. Each overlay directory is locked too: two catalogs may patch one overlay.
    """
    overlays = [(catalog.root / o.path).resolve() for m in catalog.models for o in m.overlays]
    with (shared if check else exclusive)(catalog.file), directories_locked(overlays, share=check):
        planned = plan_patches(catalog, names, allow_unpushed=allow_unpushed, prune=prune, registry=registry)
        orphaned = orphaned_patches(catalog, registry) if names is None and not prune else {}
        return (
            planned,
            list(stale_files(planned)) if check else write_patches(planned),
            [path for paths in orphaned.values() for path in paths],
        )


def write_patches(planned: list[PlannedFile]) -> list[PlannedFile]:
    """Write (or remove) what changed; return those files. A patch file is written before the
    kustomization.yaml that comes to name it, and removed after the one that stops naming it: a run
    cut off in between leaves an overlay that still builds (with `kustomize build`, in Argo CD)."""
    for f in planned:  # what a killed run left beside a file this run has no need to write
        sweep_temps(f.path)
    changed = list(stale_files(planned))
    order = sorted(changed, key=lambda f: 2 if f.content is None else 1 if f.path.name in KUSTOMIZATION_NAMES else 0)
    # Every new file staged beside its place before any is renamed: an overlay directory this user
    # may not write fails the run with no overlay changed, instead of after the others were.
    ready: dict[Path, Path] = {}
    try:
        for f in order:
            if f.content is not None:
                ready[f.path] = staged(f.path, f.content.encode())
            # a rename onto it fails: found before any overlay changed, not after the first did
            if f.content is not None and f.path.is_dir() and not f.path.is_symlink():
                raise IsADirectoryError(errno.EISDIR, "a directory where the file goes", str(f.path))
        for f in order:
            if f.content is None:
                f.path.unlink(missing_ok=True)
            else:
                os.replace(ready[f.path], f.path)
                del ready[f.path]  # renamed: not the finally's to remove
    finally:
        for tmp in ready.values():
            tmp.unlink(missing_ok=True)
    return changed
