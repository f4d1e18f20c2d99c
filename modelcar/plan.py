"""CI fan-out: the work list (`plan`), one model per worker, and folding the results back (`merge`).

A catalog of many large models is built fastest by many machines at once, each building one
model: GitHub Actions matrix jobs or the pods of a Kubernetes Indexed Job. Workers are told a
position in the catalog (`build --index N`), not a name, because an Indexed Job can hand a pod
nothing but its completion index. Each worker writes its model's lock entry to a result file
instead of editing the shared lock (there is none to share between machines); `merge` folds the
results into the lock with the same serialization as a single build, so fanning out changes no
byte of what gets committed.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import ValidationError

from modelcar.catalog import Catalog, ModelSpec
from modelcar.errors import InputError
from modelcar.fsutil import atomic_write_bytes
from modelcar.lock import (
    Lock,
    LockedModel,
    dump_lock,
    image_answers,
    is_current,
    not_servable,
    read_lock,
    save_entries,
)
from modelcar.retry import worker_pool
from modelcar.stores import LOOKUPS

RESULT_VERSION = 1
GIB = 1 << 30
CACHE_HEADROOM = 1.2  # HF cache: the snapshot's files plus partial downloads, lock files, metadata

# Where things live inside a build pod of the Kubernetes Job.
POD_WORKSPACE = "/work"  # writable copy of the catalog and its lock (emptyDir)
POD_CATALOG_SOURCE = "/etc/modelcar/catalog"  # the ConfigMap, read-only; copied into the workspace
POD_DOCKER_CONFIG = "/etc/modelcar/docker"  # registry credentials: $DOCKER_CONFIG/config.json
POD_CACHE = "/cache"  # HF_HOME: the Hub cache and modelcar's layer-digest cache
POD_RESULTS = "/results"  # the results claim, when one is given
POD_UID = 65532  # the unprivileged user of containerfiles/modelcar-tool.Containerfile
MODELS_ANNOTATION = "modelcar.dev/models"


@dataclass(frozen=True)
class PlanEntry:
    """One unit of CI work: build the model at catalog position `index`.

    `index` is the model's position in the whole catalog, also when the plan is filtered, so
    `build --index N` means the same model on every worker whatever the plan left out.
    `commit`, `bytes` and `digest` come from the lock; they are None, 0 and None for a model
    the lock does not pin yet or pins for an older catalog entry (it is locked when built).
    """

    index: int
    model: str
    commit: str | None
    bytes: int
    digest: str | None
    local: bool = False  # a `path:` model: its files are beside the catalog, not on the Hub

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def model_at(catalog: Catalog, index: int) -> ModelSpec:
    """The catalog's model at position `index` (`build --index N`), or an error saying the range."""
    count = len(catalog.models)
    if not 0 <= index < count:
        raise InputError(
            f"{catalog.file}: --index {index} is out of range: the catalog has {count} model(s), indexes 0..{count - 1}"
        )
    return catalog.models[index]


def _pushed(
    catalog: Catalog, spec: ModelSpec, entry: LockedModel | None, has_image: Callable[[str, str], bool] | None
) -> bool:
    if entry is None or entry.image is None or entry.image.digest is None:
        return False
    if not image_answers(entry.image, spec):  # built on another base or platforms, or a tag not pushed yet
        return False
    if spec.path is not None:
        from modelcar.local import local_files_moved

        if local_files_moved(catalog, spec, entry):  # edited since `lock`: the build says what to do
            return False
    name = spec.name
    if has_image is not None:
        return has_image(name, entry.image.digest)
    # Offline answer: only a registry push records a repository, and it must be where the
    # catalog's registry puts this model now (a moved registry does not hold the image yet).
    repository = entry.image.repository
    if repository is None:
        return False
    return catalog.registry is None or repository == f"{catalog.registry}/{name}"


def plan_entries(
    catalog: Catalog,
    lock: Lock,
    *,
    changed_only: bool = False,
    has_image: Callable[[str, str], bool] | None = None,
) -> list[PlanEntry]:
    """The work list: every catalog model in catalog order, or with `changed_only` the ones to build.

    With `changed_only` a model is kept when its image is not known to be pushed: the lock has
    no entry for it, the entry no longer answers the catalog entry (source, revision,
    include or exclude changed: `lock` pins it anew), the entry has no image digest (`lock`
    drops the digest when the commit, the files or the base change), the image lacks one of the
    catalog's tags, a local model's locked files no longer match its entry (one gone, a size
    changed), or the registry lacks the image.
    The registry is asked through `has_image(model, digest)`, which the CLI asks as a push does
    (each of the image's tags names it, each platform's manifest and each blob is there); it is
    called only for entries with a digest. Without it the lock alone decides: an image counts as
    pushed when the lock records a repository (only a registry push does) under the catalog's
    registry.

    So after a catalog change, `modelcar lock` then `plan --changed-only` lists exactly the
    models whose pin moved, and a rerun after a partly failed fan-out lists what is missing.
    """
    current = []
    for spec in catalog.models:
        entry = lock.models.get(spec.name)
        current.append(entry if entry is not None and is_current(entry, spec, catalog) else None)
    pushed = [False] * len(current)
    if changed_only:
        # the registry's answers asked for together: one round trip for the catalog, not one per model
        with worker_pool(LOOKUPS, "plan") as pool:
            pushed = list(pool.map(lambda s, e: _pushed(catalog, s, e, has_image), catalog.models, current))
    entries: list[PlanEntry] = []
    for index, (spec, entry) in enumerate(zip(catalog.models, current, strict=True)):
        if pushed[index]:
            continue
        entries.append(
            PlanEntry(
                index=index,
                model=spec.name,
                commit=entry.commit if entry else None,
                bytes=entry.total_bytes if entry else 0,
                digest=entry.image.digest if entry and entry.image else None,
                local=spec.path is not None,
            )
        )
    return entries


def github_matrix(entries: list[PlanEntry]) -> dict[str, list[dict[str, Any]]]:
    """The object a workflow hands to `strategy.matrix` (`fromJSON`): one job per model.

    `index` is what the job passes to `build --index`; `commit` keys the job's Hub cache, so a
    job rebuilding an unchanged pin restores the snapshot instead of downloading it again;
    `bytes` lets a workflow pick a bigger runner for a bigger model.
    """
    return {"include": [{"model": e.model, "index": e.index, "commit": e.commit, "bytes": e.bytes} for e in entries]}


# --- Kubernetes Indexed Job -------------------------------------------------------------------


def cache_size_gib(entries: list[PlanEntry]) -> int:
    """Whole GiB of disk for one pod's Hub cache: the largest model's files plus 20 %.

    One template serves every index, so it is sized for the largest model; at least 1 GiB.
    """
    largest = max((e.bytes for e in entries), default=0)
    needed = int(largest * CACHE_HEADROOM)
    return max(1, -(-needed // GIB))


def _build_args(
    catalog_file: str, index: str, result: str | None, options: Sequence[str], model: str | None = None
) -> list[str]:
    args = ["build", "-c", catalog_file, "--push", "--index", index, *([model] if model else []), *options]
    if result is not None:
        args += ["--result", result]
    return args


def _container_command(
    entries: list[PlanEntry], catalog_file: str, results: bool, options: Sequence[str]
) -> dict[str, list[str]]:
    """`modelcar build --push --index $(JOB_COMPLETION_INDEX)` when the plan is the whole catalog.

    A filtered plan (`--changed-only`) has gaps in its catalog indexes, but an Indexed Job runs
    completion indexes 0..n-1: the pod then maps its completion index to the catalog index in a
    `case` of the image's /bin/sh, since Kubernetes cannot pick a list element by index itself,
    with the model's name, which the build checks the index against (a catalog ConfigMap made
    anew while pods start would have another model there).
    """
    if [e.index for e in entries] == list(range(len(entries))):
        index = "$(JOB_COMPLETION_INDEX)"
        result = f"{POD_RESULTS}/result-{index}.json" if results else None
        return {"command": ["modelcar"], "args": _build_args(catalog_file, index, result, options)}
    cases = " ".join(f"{n}) i={e.index} m={shlex.quote(e.model)} ;;" for n, e in enumerate(entries))
    result = f"{POD_RESULTS}/result-$i.json" if results else None
    args = _build_args(catalog_file, "$i", result, options, model="$m")
    build = " ".join(f'"{a}"' if "$i" in a or a == "$m" else shlex.quote(a) for a in args)
    script = (
        f'case "$JOB_COMPLETION_INDEX" in {cases} '
        f'*) echo "no model for completion index $JOB_COMPLETION_INDEX" >&2; exit 2 ;; esac; '
        f"exec modelcar {build}"
    )
    return {"command": ["/bin/sh", "-c", script]}


def k8s_job(
    entries: list[PlanEntry],
    *,
    catalog_path: str,
    image: str,
    parallelism: int,
    hf_secret: str = "hf-token",
    registry_secret: str = "registry-credentials",
    name: str = "modelcar-build",
    catalog_configmap: str = "modelcar-catalog",
    results_claim: str | None = None,
    storage_class: str | None = None,
    cpu: str = "2",
    memory: str = "4Gi",
    retries: int = 2,
    build_options: Sequence[str] = (),
    pod_uid: int | None = POD_UID,
) -> dict[str, Any]:
    """A Kubernetes Indexed Job building one model per pod and pushing it to the registry.

    `build_options` go on every pod's `modelcar build` (`--registry`, `--insecure-registry`: the
    registry the plan was made for).

    - Work assignment: completion index n builds the n-th plan entry (`build --index`).
    - Catalog: the ConfigMap `catalog_configmap` holds the catalog and its lock under their file
      names (`kubectl create configmap NAME --from-file=catalog.yaml --from-file=catalog.lock`).
      An init container copies both into a writable emptyDir at /work, where `build` may write
      beside the catalog. The lock must pin every planned model (run `modelcar lock` first):
      every pod then builds the commit the plan listed, and the volume is sized from it. `path:`
      models need their directory next to the catalog, which a ConfigMap does not carry: build
      those on a machine with the repository checkout.
    - Credentials: HF_TOKEN from key `token` of the Secret `hf_secret` (optional: public models
      need none); the registry's from the `kubernetes.io/dockerconfigjson` Secret
      `registry_secret` (`kubectl create secret docker-registry`), mounted as
      $DOCKER_CONFIG/config.json.
    - Disk: the Hub cache (HF_HOME) on an emptyDir with a sizeLimit and a matching
      ephemeral-storage request, so a pod is scheduled only where the largest model fits; with
      `storage_class`, a generic ephemeral volume of that class instead (node disks too small).
    - Results: pods push, and the registry keeps the images under their commit tags. With
      `results_claim` (a ReadWriteMany PVC when pods may land on several nodes) each pod also
      writes `/results/result-<catalog index>.json` for `modelcar merge`. Without one, record the
      digests afterwards with `modelcar build --push` where the lock lives: every layer is in the
      registry already, so it downloads and uploads nothing.
    - Failure: restartPolicy Never and `backoffLimitPerIndex`, so a model that keeps failing
      (`retries` times) does not use up the retries of the others; the rest still build.
    - User: the pods run as `pod_uid` (the tool image's unprivileged user); None leaves the UID
      and fsGroup to the cluster (OpenShift's restricted SCC refuses a fixed UID outside the
      namespace's range and assigns one), non-root all the same.
    """
    if not entries:
        raise InputError("nothing to build: the plan is empty (with --changed-only: every image is pushed already)")
    unlocked = [e.model for e in entries if e.commit is None]
    if unlocked:
        raise InputError(
            f"{', '.join(unlocked)}: not pinned by the lock (or pinned for an older catalog entry); "
            "run `modelcar lock` first: the Job builds the lock's commits and sizes its volume from them"
        )
    local = [e.model for e in entries if e.local]
    if local:
        raise InputError(
            f"{', '.join(local)}: a `path:` model's files are beside the catalog, which the Job's pods do not "
            "have (they get the catalog and the lock): build it where the repository is checked out"
        )
    if parallelism < 1:
        raise InputError(f"--parallelism {parallelism}: must be at least 1")
    catalog_name = PurePosixPath(catalog_path).name
    lock_name = PurePosixPath(catalog_name).with_suffix(".lock").name
    catalog_file = f"{POD_WORKSPACE}/{catalog_name}"
    size = f"{cache_size_gib(entries)}Gi"

    cache_volume: dict[str, Any]
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    if storage_class is None:
        cache_volume = {"name": "cache", "emptyDir": {"sizeLimit": size}}
        requests["ephemeral-storage"] = size
    else:
        cache_volume = {
            "name": "cache",
            "ephemeral": {
                "volumeClaimTemplate": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "modelcar"}},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": storage_class,
                        "resources": {"requests": {"storage": size}},
                    },
                }
            },
        }

    volumes: list[dict[str, Any]] = [
        {
            "name": "catalog",
            "configMap": {
                "name": catalog_configmap,
                "items": [{"key": catalog_name, "path": catalog_name}, {"key": lock_name, "path": lock_name}],
            },
        },
        {"name": "workspace", "emptyDir": {}},
        cache_volume,
        {
            "name": "registry-credentials",
            "secret": {
                "secretName": registry_secret,
                "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
            },
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": POD_WORKSPACE},
        {"name": "cache", "mountPath": POD_CACHE},
        {"name": "registry-credentials", "mountPath": POD_DOCKER_CONFIG, "readOnly": True},
    ]
    if results_claim is not None:
        volumes.append({"name": "results", "persistentVolumeClaim": {"claimName": results_claim}})
        mounts.append({"name": "results", "mountPath": POD_RESULTS})

    def hardened() -> dict[str, Any]:  # fresh dicts: shared ones would dump as YAML anchors
        return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

    def labels() -> dict[str, str]:
        return {"app.kubernetes.io/name": "modelcar", "app.kubernetes.io/component": "build"}

    build = {
        "name": "build",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        **_container_command(entries, catalog_file, results_claim is not None, build_options),
        "workingDir": POD_WORKSPACE,
        "env": [
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": hf_secret, "key": "token", "optional": True}},
            },
            {"name": "HF_HOME", "value": POD_CACHE},
            {"name": "HF_HUB_CACHE", "value": f"{POD_CACHE}/hub"},
            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
            {"name": "DOCKER_CONFIG", "value": POD_DOCKER_CONFIG},
        ],
        "resources": {"requests": requests, "limits": {"memory": memory}},
        "volumeMounts": mounts,
        "securityContext": hardened(),
    }
    copy_catalog = {
        "name": "catalog",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["cp", f"{POD_CATALOG_SOURCE}/{catalog_name}", f"{POD_CATALOG_SOURCE}/{lock_name}", POD_WORKSPACE],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [
            {"name": "catalog", "mountPath": POD_CATALOG_SOURCE, "readOnly": True},
            {"name": "workspace", "mountPath": POD_WORKSPACE},
        ],
        "securityContext": hardened(),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": labels(),
            "annotations": {MODELS_ANNOTATION: ",".join(f"{n}={e.model}" for n, e in enumerate(entries))},
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": len(entries),
            "parallelism": min(parallelism, len(entries)),
            "backoffLimitPerIndex": retries,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {
                        "runAsNonRoot": True,
                        **({"runAsUser": pod_uid, "runAsGroup": pod_uid, "fsGroup": pod_uid} if pod_uid else {}),
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": [copy_catalog],
                    "containers": [build],
                    "volumes": volumes,
                },
            },
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Write a repeated object out again instead of as an anchor: manifests stay plain to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _find(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(i for i in items if i.get("name") == name)


def dump_k8s_job(job: dict[str, Any]) -> str:
    """The Job as YAML, headed by the commands that create what it expects to find.

    Deterministic (the example in examples/ci is compared byte for byte); the header is
    read back from the Job itself so it always names the ConfigMap and Secrets it uses.
    """
    pod = job["spec"]["template"]["spec"]
    volumes = pod["volumes"]
    items = _find(volumes, "catalog")["configMap"]
    configmap = items["name"]
    files = " ".join(f"--from-file={i['path']}" for i in items["items"])
    registry_secret = _find(volumes, "registry-credentials")["secret"]["secretName"]
    hf_secret = _find(pod["containers"][0]["env"], "HF_TOKEN")["valueFrom"]["secretKeyRef"]["name"]
    models = job["metadata"]["annotations"][MODELS_ANNOTATION].replace(",", ", ")
    lines = [
        "# modelcar build: an Indexed Job, one pod per model; rendered by `modelcar plan --format k8s-job`.",
        f"# Completion index -> model: {models}",
        "# Create in the Job's namespace first (from the directory holding the catalog):",
        f"#   kubectl create configmap {configmap} {files}",
        f"#   kubectl create secret docker-registry {registry_secret} --docker-server=HOST "
        "--docker-username=USER --docker-password=TOKEN",
        f"#   kubectl create secret generic {hf_secret} --from-literal=token=hf_...   # optional: gated/private models",
    ]
    claim = next((v for v in volumes if v["name"] == "results"), None)
    if claim is not None:
        lines.append(
            f"# Results land in the PVC {claim['persistentVolumeClaim']['claimName']} as result-<index>.json: "
            "copy them out and run `modelcar merge RESULT...`."
        )
    else:
        lines.append("# Then record the digests in the lock: `modelcar build --push` (the registry holds every layer).")
    lines.append("# A Job's pod template is immutable: delete the old Job before applying a new render.")
    body = yaml.dump(job, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False, width=1 << 16)
    return "\n".join(lines) + "\n" + body


# --- partial results and merge ---------------------------------------------------------------


def result_document(name: str, entry: LockedModel) -> dict[str, Any]:
    """What `build --index N --result FILE` writes: the model's lock entry, as the lock has it.

    `{"version": 1, "model": NAME, "entry": {source, revision, commit, include, exclude,
    files, image}}`; the entry is exactly what a single build would put in the lock, so a
    merge only has to place it.
    """
    return {"version": RESULT_VERSION, "model": name, "entry": entry.model_dump(mode="json", exclude_none=True)}


def write_result(path: Path, name: str, entry: LockedModel) -> None:
    """Write a result document atomically (a worker killed mid-write leaves no half file to merge)."""
    text = json.dumps(result_document(name, entry), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())


def parse_result(doc: object, where: Path | str) -> tuple[str, LockedModel]:
    """The model name and lock entry of a result document; errors name `where` (the file)."""
    if not isinstance(doc, dict) or not {"version", "model", "entry"} <= doc.keys():
        raise InputError(
            f"{where}: not a modelcar build result (expected a JSON object with version, model and entry, "
            "as `modelcar build --index N --result FILE` writes)"
        )
    extra = sorted(set(doc) - {"version", "model", "entry"})
    if extra:
        raise InputError(f"{where}: unknown key(s) {', '.join(extra)} in a build result")
    if doc["version"] != RESULT_VERSION:
        raise InputError(
            f"{where}: result version {doc['version']!r} is not supported (expected {RESULT_VERSION}); "
            "build and merge with the same modelcar version"
        )
    name = doc["model"]
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: model: must be the model's name, a non-empty string")
    try:
        entry = LockedModel.model_validate(doc["entry"])
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in ("entry", *first["loc"]))
        raise InputError(f"{where}: {name}: {loc}: {first['msg']}") from None
    return name, entry


def load_result_document(path: Path) -> object:
    """The JSON document of a result file, unchecked (see parse_result); errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: result file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the result file: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); was the build interrupted? build the model again") from None


def _describe_entry(entry: LockedModel) -> str:
    digest = entry.image.digest if entry.image else None
    where = f" in {entry.repository}" if entry.repository else ""
    return f"commit {entry.commit}, image {digest or 'none'}{where}"


def _canonical(entry: LockedModel) -> str:
    """The entry as the lock writes it: two results are the same when they would write the same bytes."""
    return dump_lock(Lock(models={"model": entry}))


def merge_result_files(catalog: Catalog, paths: Sequence[Path]) -> tuple[Lock, bool]:
    """Fold CI workers' result files into the lock on disk: the bytes one machine building them all
    would write. Each result replaces its model's entry and models the catalog lost are dropped,
    under the lock's file lock, as a build saves its entries (`lock.save_entries`); the results
    are checked first (`result_entries`). Returns the lock and whether its file changed."""
    docs = [(path, load_result_document(path)) for path in paths]
    return save_entries(catalog, result_entries(catalog, docs, read_lock(catalog.lock_file)))


def result_entries(catalog: Catalog, results: list[tuple[Path, object]], lock: Lock) -> dict[str, LockedModel]:
    """Each result's model and lock entry, checked against the catalog, the lock and each other.

    The same result twice (a retried worker) is fine; two different entries for one model are an
    error naming both files, since either may be the one that is served. A result for a model the
    catalog does not have, or built from another version of its catalog entry, or without an image
    digest, is an error naming its file; so is one of another commit than the lock pins for an
    unchanged catalog entry (a result left from an earlier run: merging it would roll the pin back).
    """
    specs = {m.name: m for m in catalog.models}
    chosen: dict[str, tuple[Path, LockedModel]] = {}
    for path, doc in results:
        name, entry = parse_result(doc, path)
        spec = specs.get(name)
        if spec is None:
            raise InputError(
                f"{path}: model {name!r} is not in {catalog.file} (it has: {', '.join(sorted(specs))}); "
                "merge with the catalog the workers built from"
            )
        if not is_current(entry, spec, catalog):
            raise InputError(
                f"{path}: {name}: built from another version of its catalog entry (source, revision, include or "
                f"exclude differ from {catalog.file}); build it again"
            )
        if entry.image is None or entry.image.digest is None:
            raise InputError(f"{path}: {name}: the result has no image digest; build the model again")
        if not_servable(entry.image, spec):  # `patch` would refuse it
            raise InputError(
                f"{path}: {name}: built on another base or for other platforms than {catalog.file} gives it, "
                "or the result does not say (a worker older than this modelcar); build it again"
            )
        pinned = lock.models.get(name)
        if pinned is not None and is_current(pinned, spec, catalog) and pinned.commit != entry.commit:
            raise InputError(
                f"{path}: {name}: built commit {entry.commit[:12]}, but {catalog.lock_file.name} pins "
                f"{pinned.commit[:12]}: a result from an earlier run? build the model again"
            )
        if name in chosen:
            first_path, first = chosen[name]
            if _canonical(first) != _canonical(entry):
                raise InputError(
                    f"{name}: conflicting results: {first_path} has {_describe_entry(first)}; "
                    f"{path} has {_describe_entry(entry)}; remove the wrong one and merge again"
                )
            continue
        chosen[name] = (path, entry)
    return {name: entry for name, (_, entry) in chosen.items()}
