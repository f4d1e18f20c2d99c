"""CI fan-out pieces: the plan, the GitHub matrix, the Kubernetes Indexed Job (validated by
`kubernetes-validate --strict` for 1.33 and 1.35), result files and their merge, and the examples
in examples/ci."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcar import __version__
from modelcar.catalog import Catalog, load_catalog
from modelcar.errors import InputError
from modelcar.lock import Lock, LockedFile, LockedImage, LockedModel, dump_lock, read_lock, save_entries, write_lock
from modelcar.plan import (
    GIB,
    PlanEntry,
    dump_k8s_job,
    github_matrix,
    k8s_job,
    load_result_document,
    merge_result_files,
    model_at,
    parse_result,
    plan_entries,
    result_document,
    write_result,
)
from tests.conftest import Cli, require_tool, write_catalog
from tests.fakehub import FakeHub

REPO = Path(__file__).resolve().parent.parent
TOOL_IMAGE = f"ghcr.io/acme/modelcar:{__version__}"  # examples/ci/k8s-job.yaml's
WORKFLOW = REPO / "examples" / "ci" / "github-actions.yaml"
SUBCOMMANDS = {"lock", "build", "push", "patch", "mirror", "verify", "inspect", "plan", "merge", "containerfile"}
REGISTRY = "registry.example/models"

CATALOG = f"""\
registry: {REGISTRY}
models:
  - name: alpha
    hf: org/alpha
  - name: beta
    hf: org/beta
    revision: v2
    include: ["*.json", "*.safetensors"]
  - name: gamma
    hf: org/gamma
"""


def _sha(n: int) -> str:
    return f"{n:064x}"


def _digest(n: int) -> str:
    return f"sha256:{_sha(1000 + n)}"


def _entry(
    source: str,
    revision: str | None,
    commit: str,
    sizes: list[int],
    *,
    include: list[str] | None = None,
    image: LockedImage | None = None,
) -> LockedModel:
    # Files listed out of order on purpose: the lock's serialization sorts them.
    files = [LockedFile(path=f"model-{i:02d}.safetensors", size=s, sha256=_sha(i)) for i, s in enumerate(sizes)]
    return LockedModel(
        source=source,
        revision=revision,
        commit=commit,
        include=include or ["*"],
        files=list(reversed(files)),
        image=image,
    )


def _entries() -> dict[str, LockedModel]:
    """Lock entries as a build with --push records them for CATALOG."""
    return {
        "alpha": _entry(
            "hf://org/alpha",
            "main",
            "a" * 40,
            [100, 200],
            image=LockedImage(digest=_digest(1), repository=f"{REGISTRY}/alpha", base="scratch", tags=[]),
        ),
        "beta": _entry(
            "hf://org/beta",
            "v2",
            "b" * 40,
            [5 * GIB, 7],
            include=["*.json", "*.safetensors"],
            image=LockedImage(digest=_digest(2), repository=f"{REGISTRY}/beta", base="scratch", tags=[]),
        ),
        "gamma": _entry(
            "hf://org/gamma",
            "main",
            "c" * 40,
            [42],
            image=LockedImage(digest=_digest(3), repository=f"{REGISTRY}/gamma", base="scratch", tags=[]),
        ),
    }


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog(write_catalog(tmp_path / "gitops" / "catalog.yaml", CATALOG))


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else require_tool(name)


def _validate(text: str) -> None:
    for version in ("1.33.0", "1.35.0"):
        check = subprocess.run(
            [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, "-"],
            input=text,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, f"{version}: {check.stdout}{check.stderr}"


# --- plan -----------------------------------------------------------------------------------


def test_plan_is_the_catalog_in_order_with_the_lock_pins(catalog: Catalog) -> None:
    entries = _entries()
    del entries["beta"]
    entries = plan_entries(catalog, Lock(models=entries))
    assert entries == [
        PlanEntry(index=0, model="alpha", commit="a" * 40, bytes=300, digest=_digest(1)),
        PlanEntry(index=1, model="beta", commit=None, bytes=0, digest=None),  # not locked yet
        PlanEntry(index=2, model="gamma", commit="c" * 40, bytes=42, digest=_digest(3)),
    ]
    assert entries[0].to_json() == {
        "index": 0,
        "model": "alpha",
        "commit": "a" * 40,
        "bytes": 300,
        "digest": _digest(1),
        "local": False,
    }


def test_changed_only_asks_the_registry_and_keeps_catalog_indexes(catalog: Catalog) -> None:
    lock = Lock(models=_entries())
    lock.models["gamma"].image = None  # locked, never built
    asked: list[tuple[str, str]] = []

    def has_image(model: str, digest: str) -> bool:
        asked.append((model, digest))
        return model == "alpha"

    entries = plan_entries(catalog, lock, changed_only=True, has_image=has_image)
    assert [(e.index, e.model) for e in entries] == [(1, "beta"), (2, "gamma")]
    assert sorted(asked) == [("alpha", _digest(1)), ("beta", _digest(2))]  # only entries with a digest
    assert [e.model for e in plan_entries(catalog, lock, changed_only=True, has_image=lambda m, d: True)] == ["gamma"]


def test_changed_only_asks_the_registry_about_every_model_at_once(catalog: Catalog) -> None:
    """200 models through a registry 30 ms away took 200 round trips one after another."""
    import threading

    together = threading.Barrier(3, timeout=30)  # each answer waits for the other two questions

    def has_image(model: str, digest: str) -> bool:
        together.wait()
        return model == "alpha"

    entries = plan_entries(catalog, Lock(models=_entries()), changed_only=True, has_image=has_image)
    assert [e.model for e in entries] == ["beta", "gamma"]


def test_changed_only_after_a_catalog_change_lists_exactly_the_changed_models(catalog: Catalog) -> None:
    lock = Lock(models=_entries())
    assert plan_entries(catalog, lock, changed_only=True, has_image=lambda m, d: True) == []
    text = CATALOG.replace("revision: v2", "revision: v3").replace("hf: org/gamma", "hf: org/gamma2")
    changed = load_catalog(write_catalog(catalog.file, text))
    entries = plan_entries(changed, lock, changed_only=True, has_image=lambda m, d: True)
    assert entries == [
        PlanEntry(index=1, model="beta", commit=None, bytes=0, digest=None),
        PlanEntry(index=2, model="gamma", commit=None, bytes=0, digest=None),
    ]
    # After `modelcar lock` re-pins beta to a new commit (dropping its digest), it is listed by its pin.
    lock.models["beta"] = _entry("hf://org/beta", "v3", "d" * 40, [9], include=["*.json", "*.safetensors"])
    entries = plan_entries(changed, lock, changed_only=True, has_image=lambda m, d: True)
    assert [(e.model, e.commit, e.bytes) for e in entries] == [("beta", "d" * 40, 9), ("gamma", None, 0)]


def test_changed_only_lists_a_model_given_a_new_base_or_a_new_tag(catalog: Catalog) -> None:
    lock = Lock(models=_entries())
    assert plan_entries(catalog, lock, changed_only=True, has_image=lambda m, d: True) == []
    base = "registry.example/shell@sha256:" + "e" * 64
    text = CATALOG.replace("    hf: org/alpha\n", f"    hf: org/alpha\n    base: {base}\n")
    text = text.replace("    revision: v2\n", "    revision: v2\n    tags: [stable]\n")
    changed = load_catalog(write_catalog(catalog.file, text))
    # the registry holds both digests, but neither image is the one the catalog now asks for
    entries = plan_entries(changed, lock, changed_only=True, has_image=lambda m, d: True)
    assert [e.model for e in entries] == ["alpha", "beta"]
    lock.models["alpha"].image = LockedImage(digest=_digest(9), base=base, tags=[])
    lock.models["beta"].image = LockedImage(digest=_digest(2), base="scratch", tags=["stable"])
    assert plan_entries(changed, lock, changed_only=True, has_image=lambda m, d: True) == []
    # a lock from before bases and tags were recorded: each model is built once more, which records them
    older = Lock(models=_entries())
    for entry in older.models.values():
        assert entry.image is not None
        entry.image = LockedImage(digest=entry.image.digest, repository=entry.image.repository)
    listed = plan_entries(catalog, older, changed_only=True, has_image=lambda m, d: True)
    assert [e.model for e in listed] == ["alpha", "beta", "gamma"]


def test_changed_only_lists_a_model_given_other_platforms(catalog: Catalog) -> None:
    lock = Lock(models=_entries())
    for entry in lock.models.values():
        assert entry.image is not None
        entry.image.base, entry.image.tags = "scratch", []
    assert plan_entries(catalog, lock, changed_only=True, has_image=lambda m, d: True) == []
    text = CATALOG.replace("    hf: org/alpha\n", "    hf: org/alpha\n    platforms: [linux/s390x]\n")
    changed = load_catalog(write_catalog(catalog.file, text))
    entries = plan_entries(changed, lock, changed_only=True, has_image=lambda m, d: True)
    assert [e.model for e in entries] == ["alpha"]  # the registry holds its digest, but that is amd64 + arm64
    assert lock.models["alpha"].image is not None
    lock.models["alpha"].image.platforms = ["linux/s390x"]
    assert plan_entries(changed, lock, changed_only=True, has_image=lambda m, d: True) == []


def test_changed_only_offline_trusts_recorded_repositories(catalog: Catalog) -> None:
    """Without a registry to ask, a model counts as pushed only where the lock records it in the
    catalog's registry: built into a layout only, or pushed to a registry the catalog has left,
    it is listed (base and tags as the catalog asks, so only the repository decides)."""
    lock = Lock(models=_entries())
    assert plan_entries(catalog, lock, changed_only=True) == []
    lock.models["alpha"].image = LockedImage(digest=_digest(1), base="scratch", tags=[])  # in a layout only
    lock.models["beta"].image = LockedImage(
        digest=_digest(2), repository="other.example/models/beta", base="scratch", tags=["stable"]
    )
    assert [e.model for e in plan_entries(catalog, lock, changed_only=True)] == ["alpha", "beta"]


def test_model_at(catalog: Catalog) -> None:
    assert model_at(catalog, 2).name == "gamma"
    for bad in (3, -1):
        with pytest.raises(InputError, match=r"--index .* out of range: the catalog has 3 model\(s\), indexes 0\.\.2"):
            model_at(catalog, bad)


def test_github_matrix_has_what_the_workflow_uses(catalog: Catalog) -> None:
    matrix = github_matrix(plan_entries(catalog, Lock(models=_entries())))
    assert matrix == {
        "include": [
            {"model": "alpha", "index": 0, "commit": "a" * 40, "bytes": 300},
            {"model": "beta", "index": 1, "commit": "b" * 40, "bytes": 5 * GIB + 7},
            {"model": "gamma", "index": 2, "commit": "c" * 40, "bytes": 42},
        ]
    }
    json.dumps(matrix)  # what `plan --format github-matrix` prints
    expressions = re.findall(r"\$\{\{(.*?)\}\}", WORKFLOW.read_text())
    used = {field for e in expressions for field in re.findall(r"\bmatrix\.(\w+)", e)}
    assert used and used <= set(matrix["include"][0]), used


# --- Kubernetes Job -------------------------------------------------------------------------


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"])


def test_k8s_job_is_a_valid_indexed_job(catalog: Catalog) -> None:
    entries = plan_entries(catalog, Lock(models=_entries()))
    job = k8s_job(entries, catalog_path="gitops/catalog.yaml", image="registry.example/modelcar:1", parallelism=2)
    text = dump_k8s_job(job)
    _validate(text)
    assert "&id" not in text and "*id" not in text  # no YAML anchors
    assert yaml.safe_load(text) == job
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == (3, 2, 2)
    assert job["metadata"]["annotations"]["modelcar.dev/models"] == "0=alpha,1=beta,2=gamma"
    pod = _pod(job)
    assert pod["restartPolicy"] == "Never"
    (build,) = pod["containers"]
    assert build["image"] == "registry.example/modelcar:1"
    assert [build["command"], build["args"]] == [
        ["modelcar"],
        ["build", "-c", "/work/catalog.yaml", "--push", "--index", "$(JOB_COMPLETION_INDEX)"],
    ]
    env = {e["name"]: e for e in build["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}
    assert env["HF_HUB_CACHE"]["value"] == "/cache/hub"
    assert env["DOCKER_CONFIG"]["value"] == "/etc/modelcar/docker"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["registry-credentials"]["secret"] == {
        "secretName": "registry-credentials",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
    }
    assert volumes["catalog"]["configMap"]["items"] == [
        {"key": "catalog.yaml", "path": "catalog.yaml"},
        {"key": "catalog.lock", "path": "catalog.lock"},
    ]
    # largest model 5 GiB + 7 bytes, plus 20 %: 6 GiB and a bit, rounded up
    assert volumes["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "7Gi"}}
    assert build["resources"]["requests"] == {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "7Gi"}
    mounts = {m["mountPath"]: m["name"] for m in build["volumeMounts"]}
    assert mounts == {"/work": "workspace", "/cache": "cache", "/etc/modelcar/docker": "registry-credentials"}
    (init,) = pod["initContainers"]
    source = "/etc/modelcar/catalog"
    assert init["command"] == ["cp", f"{source}/catalog.yaml", f"{source}/catalog.lock", "/work"]
    assert "kubectl create configmap modelcar-catalog --from-file=catalog.yaml --from-file=catalog.lock" in text
    assert "kubectl create secret docker-registry registry-credentials" in text


def test_k8s_job_options(catalog: Catalog) -> None:
    lock = Lock(models=_entries())
    entries = plan_entries(catalog, lock, changed_only=True, has_image=lambda m, d: m == "beta")
    assert [e.index for e in entries] == [0, 2]
    job = k8s_job(
        entries,
        catalog_path="models.yaml",
        image=TOOL_IMAGE,
        parallelism=8,
        hf_secret="hub",
        registry_secret="push-creds",
        name="rebuild",
        catalog_configmap="gitops",
        results_claim="modelcar-results",
        storage_class="fast-ssd",
        cpu="4",
        memory="8Gi",
        retries=5,
    )
    text = dump_k8s_job(job)
    _validate(text)
    assert job["metadata"]["name"] == "rebuild"
    assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["backoffLimitPerIndex"]) == (2, 2, 5)
    pod = _pod(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["ephemeral"]["volumeClaimTemplate"]["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast-ssd",
        "resources": {"requests": {"storage": "1Gi"}},
    }
    assert volumes["results"]["persistentVolumeClaim"] == {"claimName": "modelcar-results"}
    assert volumes["registry-credentials"]["secret"]["secretName"] == "push-creds"
    assert volumes["catalog"]["configMap"]["name"] == "gitops"
    assert [i["key"] for i in volumes["catalog"]["configMap"]["items"]] == ["models.yaml", "models.lock"]
    (build,) = pod["containers"]
    assert build["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    assert {e["name"]: e for e in build["env"]}["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hub"
    assert "kubectl create secret generic hub --from-literal=token=" in text
    assert "PVC modelcar-results" in text


def test_filtered_k8s_job_maps_completion_indexes_to_catalog_indexes(catalog: Catalog, tmp_path: Path) -> None:
    """Run the pod's script with /bin/sh and a stand-in `modelcar`, for every completion index."""
    entries = plan_entries(catalog, Lock(models=_entries()), changed_only=True, has_image=lambda m, d: m == "beta")
    job = k8s_job(entries, catalog_path="catalog.yaml", image="x/y:1", parallelism=1, results_claim="r")
    (build,) = _pod(job)["containers"]
    assert build["command"][:2] == ["/bin/sh", "-c"] and "args" not in build
    stub = tmp_path / "bin" / "modelcar"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    sh = shutil.which("sh") or "/bin/sh"
    for completion, catalog_index in [(0, 0), (1, 2)]:
        out = subprocess.run(
            [sh, "-c", build["command"][2]],
            env={**env, "JOB_COMPLETION_INDEX": str(completion)},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:-1] == [
            "build",
            "-c",
            "/work/catalog.yaml",
            "--push",
            "--index",
            str(catalog_index),
            entries[completion].model,  # checked against the index: a catalog changed since says so
            "--result",
            f"/results/result-{catalog_index}.json",
        ]
    out = subprocess.run([sh, "-c", build["command"][2]], env={**env, "JOB_COMPLETION_INDEX": "2"}, capture_output=True)
    assert out.returncode == 2


def test_k8s_job_refuses_what_it_cannot_run(catalog: Catalog) -> None:
    with pytest.raises(InputError, match="nothing to build"):
        k8s_job([], catalog_path="catalog.yaml", image="x/y:1", parallelism=1)
    entries = plan_entries(catalog, Lock(models={"alpha": _entries()["alpha"]}))
    with pytest.raises(InputError, match=r"^beta, gamma: not pinned by the lock .* run `modelcar lock` first"):
        k8s_job(entries, catalog_path="catalog.yaml", image="x/y:1", parallelism=1)
    with pytest.raises(InputError, match="--parallelism 0"):
        k8s_job(entries[:1], catalog_path="catalog.yaml", image="x/y:1", parallelism=0)


def test_example_k8s_job_is_the_render_of_the_example_catalog(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """examples/ci/k8s-job.yaml is `lock` then `plan --format k8s-job` of examples/ci/catalog.yaml,
    against the test Hub (its models' small files stand in for theirs: the volume is the 1 GiB floor)."""
    example = REPO / "examples" / "ci" / "catalog.yaml"
    cat = write_catalog(tmp_path / "examples" / "ci" / "catalog.yaml", example.read_text())
    for spec in load_catalog(cat).models:
        assert spec.hf is not None
        fake_hub.add_repo(spec.hf, {"config.json": b"{}\n", "model.safetensors": b"\0" * 2048})
    cli("lock", "-c", cat)
    catalog = load_catalog(cat)
    job = k8s_job(
        plan_entries(catalog, read_lock(catalog.lock_file)),
        catalog_path="examples/ci/catalog.yaml",
        image=TOOL_IMAGE,
        parallelism=4,
    )
    text = dump_k8s_job(job)
    assert (REPO / "examples" / "ci" / "k8s-job.yaml").read_text() == text
    _validate(text)


def test_a_k8s_job_builds_for_the_registry_the_plan_was_made_for(catalog: Catalog) -> None:
    entries = plan_entries(catalog, Lock(models=_entries()))
    options = ["--registry", "mirror.internal:5000/models", "--insecure-registry=mirror.internal:5000"]
    job = k8s_job(entries, catalog_path="catalog.yaml", image="x/y:1", parallelism=1, build_options=options)
    (build,) = _pod(job)["containers"]
    assert build["args"][:6] == ["build", "-c", "/work/catalog.yaml", "--push", "--index", "$(JOB_COMPLETION_INDEX)"]
    assert build["args"][6:] == options
    filtered = k8s_job(entries[1:], catalog_path="catalog.yaml", image="x/y:1", parallelism=1, build_options=options)
    (build,) = _pod(filtered)["containers"]
    assert build["command"][2].endswith(
        'exec modelcar build -c /work/catalog.yaml --push --index "$i" "$m" --registry mirror.internal:5000/models '
        "--insecure-registry=mirror.internal:5000"
    )


def test_a_k8s_job_can_leave_the_uid_to_the_cluster(cli: Cli, catalog: Catalog) -> None:
    """OpenShift's restricted SCC refuses a fixed UID outside the namespace's range and assigns
    one itself: `--pod-user namespace` leaves runAsUser, runAsGroup and fsGroup out, not runAsNonRoot."""
    entries = plan_entries(catalog, Lock(models=_entries()))
    job = k8s_job(entries, catalog_path="catalog.yaml", image="x/y:1", parallelism=1, pod_uid=None)
    _validate(dump_k8s_job(job))
    assert _pod(job)["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    fixed = k8s_job(entries, catalog_path="catalog.yaml", image="x/y:1", parallelism=1)
    assert _pod(fixed)["securityContext"]["runAsUser"] == _pod(fixed)["securityContext"]["fsGroup"] == 65532
    for bad in ("0", "²", "٣", str(2**31)):
        result = cli(
            "plan", "-c", catalog.file, "--format", "k8s-job", "--image", TOOL_IMAGE, "--pod-user", bad, code=2
        )
        assert f"--pod-user {bad!r}: a UID from 1 to 2147483647, or `namespace`" in result.stderr
    catalog.lock_file.write_text(dump_lock(Lock(models=_entries())))
    rendered = cli(
        "plan", "-c", catalog.file, "--format", "k8s-job", "--image", TOOL_IMAGE, "--pod-user", "namespace"
    ).stdout
    (job,) = [doc for doc in yaml.safe_load_all(rendered) if doc and doc.get("kind") == "Job"]
    assert "runAsUser" not in _pod(job)["securityContext"]


def test_plan_format_is_case_insensitive(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    assert json.loads(cli("plan", "-c", cat, "--format", "JSON").stdout)[0]["model"] == "alpha"
    assert "use github-matrix, k8s-job or json" in cli("plan", "-c", cat, "--format", "yaml", code=2).stderr


def test_plan_checks_the_registry_name_whatever_the_format(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    result = cli("plan", "-c", cat, "--registry", "https://bob:s3cret@h.io/m", code=2)
    assert "--registry: credentials do not go in a registry name" in result.stderr and "s3cret" not in result.stderr


def _locked_ci_catalog(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> Path:
    """examples/ci/catalog.yaml (Hub models only), its repos on the test Hub, locked."""
    cat = write_catalog(tmp_path / "catalog.yaml", (REPO / "examples" / "ci" / "catalog.yaml").read_text())
    for spec in load_catalog(cat).models:
        assert spec.hf is not None
        fake_hub.add_repo(spec.hf, {"config.json": b"{}\n"})
    cli("lock", "-c", cat)
    return cat


def test_plan_hands_a_results_claim_to_the_job(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _locked_ci_catalog(cli, fake_hub, tmp_path)
    text = cli(
        "plan", "-c", cat, "--format", "k8s-job", "--image", TOOL_IMAGE, "--results-claim", "modelcar-results"
    ).stdout
    _validate(text)
    job = yaml.safe_load(text)
    volumes = {v["name"]: v for v in _pod(job)["volumes"]}
    assert volumes["results"]["persistentVolumeClaim"] == {"claimName": "modelcar-results"}
    (build,) = _pod(job)["containers"]
    assert build["args"][-2:] == ["--result", "/results/result-$(JOB_COMPLETION_INDEX).json"]
    assert "run `modelcar merge RESULT...`" in text


def test_plan_sizes_the_job_s_pods_as_it_is_told(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """k8s_job took a StorageClass, CPU and memory; the command line offered none (a large model's
    cache as an emptyDir on the node's disk, which most nodes cannot schedule)."""
    cat = _locked_ci_catalog(cli, fake_hub, tmp_path)
    args = ["--storage-class", "fast-ssd", "--cpu", "8", "--memory", "16Gi"]
    text = cli("plan", "-c", cat, "--format", "k8s-job", "--image", TOOL_IMAGE, *args).stdout
    _validate(text)
    pod = _pod(yaml.safe_load(text))
    (cache,) = [v for v in pod["volumes"] if "ephemeral" in v]
    assert cache["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "fast-ssd"
    (build,) = pod["containers"]
    assert build["resources"] == {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}


def test_merge_of_no_results_keeps_the_plans_lock(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A run whose plan listed nothing to build (a model removed, a new tag on a pushed image) still
    merges: the workflow's merge job runs it with no result files."""
    cat = _locked_ci_catalog(cli, fake_hub, tmp_path)
    before = cat.with_suffix(".lock").read_bytes()
    assert cli("merge", "-c", cat).stdout == f"{cat.with_suffix('.lock')}: unchanged from 0 results\n"
    assert cat.with_suffix(".lock").read_bytes() == before


def test_a_k8s_job_names_the_tool_image_it_runs(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """No default: one would name an image nobody built, and the Job would sit in ImagePullBackOff."""
    cat = _locked_ci_catalog(cli, fake_hub, tmp_path)
    result = cli("plan", "-c", cat, "--format", "k8s-job", code=2)
    assert "--format k8s-job needs --image: the modelcar tool image the pods run" in result.stderr
    assert result.stdout == ""


def test_a_k8s_job_refuses_path_models(cli: Cli) -> None:
    result = cli("plan", "-c", REPO / "examples" / "catalog.yaml", "--format", "k8s-job", "--image", TOOL_IMAGE, code=2)
    assert "tiny-chat: a `path:` model's files are beside the catalog, which the Job's pods do not have" in (
        result.stderr
    )


def test_a_k8s_job_says_it_does_not_carry_a_local_ca_file(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    cat = _locked_ci_catalog(cli, fake_hub, tmp_path)
    (tmp_path / "ca.pem").write_text("")
    result = cli("plan", "-c", cat, "--format", "k8s-job", "--image", TOOL_IMAGE, "--ca-file", tmp_path / "ca.pem")
    assert "--ca-file is not handed to the Job: its pods need the CA in the tool image (--image)" in result.stderr
    assert "ca.pem" not in result.stdout and yaml.safe_load(result.stdout)["kind"] == "Job"


# --- results and merge ----------------------------------------------------------------------


def _results(tmp_path: Path, entries: dict[str, LockedModel]) -> list[tuple[Path, dict[str, Any]]]:
    """Result files as the workers write them, read back as `merge` reads them."""
    out = []
    for name, entry in entries.items():
        path = tmp_path / "results" / f"result-{name}.json"
        write_result(path, name, entry)
        out.append((path, json.loads(path.read_text())))
    return out


def _merged(catalog: Catalog, lock: Lock, results: list[tuple[Path, dict[str, Any]]]) -> Lock:
    """`modelcar merge` of these result files into a lock file holding `lock`."""
    write_lock(catalog.lock_file, lock)
    merged, _ = merge_result_files(catalog, [path for path, _ in results])
    assert catalog.lock_file.read_text().endswith(dump_lock(merged))
    return merged


def test_a_result_that_cannot_be_written_fails_before_the_build(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A worker's --result in a directory that takes no file failed after the download and the
    build (21 MB downloaded, 7 blobs written, for a result it could not keep)."""
    fake_hub.add_repo("org/tiny", {"config.json": b"{}\n", "model.safetensors": b"\0" * 2048})
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n")
    (tmp_path / "results").write_text("a file where the results directory should be")
    result = cli("build", "-c", cat, "--index", "0", "--result", tmp_path / "results" / "result-0.json", code=1)
    assert f"error: {tmp_path / 'results'}" in result.stderr
    assert not [p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p]  # nothing downloaded
    assert not (tmp_path / ".modelcar").exists()
    (tmp_path / "a-dir").mkdir()  # --result naming a directory: refused before the build too
    result = cli("build", "-c", cat, "--index", "0", "--result", tmp_path / "a-dir", code=1)
    assert f"error: {tmp_path / 'a-dir'}: Is a directory" in result.stderr
    assert not (tmp_path / ".modelcar").exists()
    # directories the result goes in are made by the build that writes it, not by the check: a
    # build that fails leaves none behind
    result = cli("build", "-c", cat, "nosuch", "--result", tmp_path / "out" / "sub" / "r.json", code=2)
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".*.tmp")) == []


def test_result_document_round_trips(tmp_path: Path) -> None:
    entry = _entries()["beta"]
    doc = result_document("beta", entry)
    assert doc["version"] == 1 and doc["model"] == "beta"
    expected = {"digest": _digest(2), "repository": f"{REGISTRY}/beta", "base": "scratch", "tags": []}
    assert doc["entry"]["image"] == expected
    path = tmp_path / "result.json"
    write_result(path, "beta", entry)
    assert parse_result(load_result_document(path), path) == ("beta", entry)
    assert path.read_text() == json.dumps(doc, indent=2, sort_keys=True) + "\n"


def test_merge_is_byte_identical_to_one_machine_building_everything(catalog: Catalog, tmp_path: Path) -> None:
    entries = _entries()
    save_entries(catalog, entries)  # what `build` saves on one machine
    single = catalog.lock_file.read_bytes()
    assert single == dump_lock(Lock(models=entries)).encode()

    results = _results(tmp_path, {n: entries[n] for n in ("gamma", "alpha", "beta")})  # any order
    _merged(catalog, Lock(), results)
    assert catalog.lock_file.read_bytes() == single

    # From the plan's lock: pinned, digests dropped by the re-pin, a model the catalog lost.
    planned = Lock(models={n: e.model_copy(update={"image": None}) for n, e in entries.items()})
    planned.models["removed"] = entries["alpha"]
    _merged(catalog, planned, results + results[:1])  # a retried worker: same result twice
    assert catalog.lock_file.read_bytes() == single

    # Only some models rebuilt: the others keep their entries.
    _merged(catalog, Lock(models=entries), results[:1])
    assert catalog.lock_file.read_bytes() == single


def test_a_result_of_another_commit_than_the_lock_pins_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    """A result left from an earlier run (a results volume the Job reuses): the lock has moved on
    to a new commit of the same catalog entry, and merging would roll the pin back."""
    entries = _entries()
    old = _results(tmp_path, {"beta": entries["beta"]})
    moved = Lock(models={**entries, "beta": entries["beta"].model_copy(update={"commit": "e" * 40, "image": None})})
    with pytest.raises(InputError) as err:
        _merged(catalog, moved, old)
    assert f"beta: built commit {'b' * 12}, but catalog.lock pins {'e' * 12}: a result from an earlier run?" in (
        str(err.value)
    )
    assert str(err.value).startswith(str(old[0][0]))
    # a model the lock does not pin yet, or pins for an older catalog entry, takes the worker's commit
    assert _merged(catalog, Lock(), old).models["beta"].commit == "b" * 40


def test_conflicting_results_name_both_files(catalog: Catalog, tmp_path: Path) -> None:
    entries = _entries()
    first = _results(tmp_path / "one", {"alpha": entries["alpha"]})
    image = LockedImage(digest=_digest(9), repository=f"{REGISTRY}/alpha", base="scratch", tags=[])
    other = entries["alpha"].model_copy(update={"image": image})
    second = _results(tmp_path / "two", {"alpha": other})
    with pytest.raises(InputError) as err:
        _merged(catalog, Lock(), first + second)
    message = str(err.value)
    assert message.startswith("alpha: conflicting results: ")
    assert str(first[0][0]) in message and str(second[0][0]) in message
    assert _digest(1) in message and _digest(9) in message


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("delta", {}, r"model 'delta' is not in .*catalog\.yaml \(it has: alpha, beta, gamma\)"),
        ("alpha", {"revision": "v9"}, r"alpha: built from another version of its catalog entry"),
        ("alpha", {"image": None}, r"alpha: the result has no image digest"),
        (
            "alpha",
            {"image": LockedImage(digest=_digest(1), base="registry.example/shell@sha256:" + "e" * 64)},
            r"alpha: built on another base or for other platforms than .*catalog\.yaml gives it",
        ),
        (
            "alpha",
            {"image": LockedImage(digest=_digest(1), base="scratch", platforms=["linux/s390x"])},
            r"alpha: built on another base or for other platforms than .*catalog\.yaml gives it",
        ),
    ],
)
def test_merge_refuses_results_that_do_not_fit(
    catalog: Catalog, tmp_path: Path, name: str, change: dict[str, Any], expected: str
) -> None:
    ((path, doc),) = _results(tmp_path, {name: _entries()["alpha"].model_copy(update=change)})
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {expected}"):
        _merged(catalog, Lock(), [(path, doc)])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "result file not found"),
        ("{not json", "not valid JSON"),
        ("[]", "not a modelcar build result"),
        ('{"version": 2, "model": "alpha", "entry": {}}', "result version 2 is not supported"),
        ('{"version": 1, "model": "alpha", "entry": {}, "x": 1}', r"unknown key\(s\) x"),
        ('{"version": 1, "model": "", "entry": {}}', "model: must be"),
        ('{"version": 1, "model": "alpha", "entry": {"source": "hf://a/b"}}', r"alpha: entry\.commit: Field required"),
    ],
)
def test_read_result_errors_name_the_file(catalog: Catalog, tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "result-alpha.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {expected}"):
        merge_result_files(catalog, [path])


# --- examples/ci ----------------------------------------------------------------------------


_COMMAND = re.compile(r"(?:^|[;&|(]|\bthen\b|\bdo\b)\s*modelcar[ \t]+([^\s;&|)]+)", re.MULTILINE)


def _steps(workflow: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {name: job["steps"] for name, job in workflow["jobs"].items()}


def test_example_workflow_calls_only_modelcar_commands_that_exist() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = _steps(workflow)
    assert list(steps) == ["plan", "build", "merge"]
    runs = [s["run"] for job in steps.values() for s in job if "run" in s]
    used = [sub for run in runs for sub in _COMMAND.findall(run)]
    assert set(used) <= SUBCOMMANDS, used
    assert {"lock", "plan", "build", "merge", "patch"} <= set(used)
    for job in steps.values():
        for step in job:
            assert ("run" in step) != ("uses" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_example_workflow_wires_plan_build_and_merge() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    assert jobs["build"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert jobs["build"]["needs"] == "plan" and jobs["merge"]["needs"] == ["plan", "build"]
    plan_run = next(s["run"] for s in jobs["plan"]["steps"] if s.get("id") == "plan")
    assert "modelcar plan" in plan_run and "--format github-matrix" in plan_run and "--changed-only" in plan_run
    build_steps = jobs["build"]["steps"]
    (cache,) = [s for s in build_steps if s.get("uses", "").startswith("actions/cache@")]
    assert "${{ matrix.model }}" in cache["with"]["key"] and "${{ matrix.commit }}" in cache["with"]["key"]
    (build,) = [s["run"] for s in build_steps if "modelcar build" in s.get("run", "")]
    assert "--push" in build and '--index "$INDEX"' in build and "--result" in build
    assert jobs["build"]["env"]["INDEX"] == "${{ matrix.index }}"
    merge_runs = " ".join(s.get("run", "") for s in jobs["merge"]["steps"])
    assert "modelcar merge" in merge_runs and "gh pr create" in merge_runs
    assert 'modelcar patch -c "$CATALOG" --prune' in merge_runs  # a removed model's patches go too


def test_tool_containerfile() -> None:
    text = (REPO / "containerfiles" / "modelcar-tool.Containerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"docker\.io/library/python:3\.11-slim-\w+", base)
    assert 'ENTRYPOINT ["modelcar"]' in text
    assert "USER 65532:65532" in text  # the Job's runAsUser
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), source


def test_merge_takes_a_result_that_does_not_say_its_base_unless_the_catalog_names_one(
    catalog: Catalog, tmp_path: Path
) -> None:
    """A worker of an older modelcar records no base: its result is merged as it is, but for a
    model the catalog gives a base or platforms, which `patch` would then refuse to pin."""
    image = LockedImage(digest=_digest(1), repository=f"{REGISTRY}/alpha")
    ((path, doc),) = _results(tmp_path, {"alpha": _entries()["alpha"].model_copy(update={"image": image})})
    merged = _merged(catalog, Lock(), [(path, doc)])
    assert merged.models["alpha"].image == image
    for line in ("    base: registry.example/shell@sha256:" + "e" * 64, "    platforms: [linux/amd64]"):
        text = CATALOG.replace("    hf: org/alpha\n", f"    hf: org/alpha\n{line}\n")
        asks = load_catalog(write_catalog(catalog.file, text))
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: alpha: .* or the result does not say"):
            _merged(asks, Lock(), [(path, doc)])
