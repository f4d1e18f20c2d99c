"""`modelcar patch`: example overlays rendered by `kubectl kustomize`, validated by
`kubernetes-validate --strict` (1.33 and 1.35), and asserted object by object."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcar.errors import PatchError
from modelcar.patch import HEADER
from modelcar.vllm_args import edit_kserve_args, edit_vllm_args
from tests.conftest import Cli, require_tool, write_catalog
from tests.test_registry import _base_image

REPO = Path(__file__).resolve().parent.parent
BASE_ARGS = ["--max-model-len", "8192", "--gpu-memory-utilization", "0.90", "--port", "8000"]


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else require_tool(name)


def render(overlay: Path) -> list[dict[str, Any]]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for version in ("1.33.0", "1.35.0"):
        check = subprocess.run(
            [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, "-"],
            input=out.stdout,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _find(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


@pytest.fixture
def examples(tmp_path: Path, cli: Cli) -> Path:
    """A copy of examples/ (without the build output), built and patched as the quick start does."""
    work = tmp_path / "examples"
    shutil.copytree(REPO / "examples", work, ignore=shutil.ignore_patterns(".modelcar"))
    cli("build", "-c", work / "catalog.yaml")
    cli("patch", "-c", work / "catalog.yaml", "--allow-unpushed")
    return work


def _digest(catalog: Path, name: str = "tiny-chat") -> str:
    return str(yaml.safe_load(catalog.with_suffix(".lock").read_text())["models"][name]["image"]["digest"])


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(_find(objects, "Deployment")["spec"]["template"]["spec"])


def _assert_modelcar_pod(pod: dict[str, Any], reference: str, served: str, mount: dict[str, Any]) -> None:
    volumes = [v for v in pod["volumes"] if v["name"] == "modelcar"]
    assert volumes == [{"name": "modelcar", "image": {"reference": reference, "pullPolicy": "IfNotPresent"}}]
    assert [v["name"] for v in pod["volumes"]] == ["modelcar", "shm"]  # the PVC volume is gone
    assert "initContainers" not in pod or all(c["name"] != "prestage" for c in pod["initContainers"])
    (vllm,) = pod["containers"]
    assert vllm["args"] == [served, "--served-model-name", "tiny-chat", *BASE_ARGS]
    assert vllm["command"] == ["vllm", "serve"]
    env = {e["name"]: e for e in vllm["env"]}
    assert env["HF_HUB_OFFLINE"] == {"name": "HF_HUB_OFFLINE", "value": "1"}
    assert env["TRANSFORMERS_OFFLINE"] == {"name": "TRANSFORMERS_OFFLINE", "value": "1"}
    assert env["VLLM_NO_USAGE_STATS"]["value"] == "1"  # the base's env is merged, not replaced
    mounts = sorted(vllm["volumeMounts"], key=lambda m: m["mountPath"])
    assert mounts == sorted([mount, {"name": "shm", "mountPath": "/dev/shm"}], key=lambda m: m["mountPath"])


def test_image_volume_overlay(examples: Path) -> None:
    reference = f"localhost:5000/modelcars/tiny-chat@{_digest(examples / 'catalog.yaml')}"
    objects = render(examples / "serving" / "overlays" / "raw-vllm")
    _assert_modelcar_pod(
        _pod(objects),
        reference,
        "/mnt/modelcar/models",
        {"name": "modelcar", "mountPath": "/mnt/modelcar", "readOnly": True},
    )


def test_what_a_dropped_volume_leaves_behind_is_named(examples: Path, cli: Cli) -> None:
    """The patch removes the volume and its mounts; the claim it was bound to stays a resource of
    the overlay (20Gi nobody mounts), and a variable pointing into the mount names a directory the
    pod no longer has: both are said, for the overlay's owner to remove."""
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    assert "'model' claimed the PersistentVolumeClaim 'raw-vllm-model', which stays in the overlay's" in (result.stderr)
    assert "env HF_HOME=/models/.hf is under /models, where the dropped volume 'model' was mounted" in result.stderr


def test_subpath_overlay(examples: Path) -> None:
    reference = f"localhost:5000/modelcars/tiny-chat@{_digest(examples / 'catalog.yaml')}"
    objects = render(examples / "serving" / "overlays" / "raw-vllm-subpath")
    _assert_modelcar_pod(
        _pod(objects),
        reference,
        "/mnt/models",
        {"name": "modelcar", "mountPath": "/mnt/models", "subPath": "models", "readOnly": True},
    )


def test_multi_gpu_overlay_keeps_its_own_patch(examples: Path) -> None:
    objects = render(examples / "serving" / "overlays" / "multi-gpu")
    deployment = _find(objects, "Deployment")
    assert deployment["metadata"]["name"] == "raw-vllm-multi-gpu"
    assert deployment["spec"]["replicas"] == 4
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    reference = f"localhost:5000/modelcars/tiny-chat@{_digest(examples / 'catalog.yaml')}"
    _assert_modelcar_pod(
        _pod(objects),
        reference,
        "/mnt/modelcar/models",
        {"name": "modelcar", "mountPath": "/mnt/modelcar", "readOnly": True},
    )
    text = (examples / "serving" / "overlays" / "multi-gpu" / "kustomization.yaml").read_text()
    original = (REPO / "examples" / "serving" / "overlays" / "multi-gpu" / "kustomization.yaml").read_text()
    assert text == original  # the committed overlay is what `modelcar patch` writes


KSERVE = (
    "      - path: serving/overlays/kserve\n        target: {kind: InferenceService, name: qwen-chat}\n"
    "        mode: kserve\n"
)


def _with_shell_base(tmp_path: Path, cli: Cli, overlays: str) -> Path:
    """A copy of examples/ whose model is built on a base with a shell (kserve and init-copy run
    a command in the image), listing these overlays; returns its catalog."""
    work = tmp_path / "examples"
    shutil.copytree(REPO / "examples", work, ignore=shutil.ignore_patterns(".modelcar"))
    base_digest = _base_image(tmp_path / "base")
    catalog = write_catalog(
        work / "catalog.yaml",
        "registry: registry.internal/models\nmodels:\n"
        "  - name: tiny-chat\n    path: ./models/tiny-chat\n"
        f"    base: oci:{tmp_path / 'base'}@{base_digest}\n"
        "    overlays:\n" + overlays,
    )
    cli("build", "-c", catalog)
    return catalog


def test_kserve_overlay(tmp_path: Path, cli: Cli) -> None:
    catalog = _with_shell_base(tmp_path, cli, KSERVE)
    result = cli("patch", "-c", catalog, code=1)  # built, not pushed: the reference it would pin is named
    assert "--allow-unpushed to pin `registry.internal/models/tiny-chat` with the lock's digest" in result.stderr
    cli("patch", "-c", catalog, "--allow-unpushed")
    objects = render(catalog.parent / "serving" / "overlays" / "kserve")
    isvc = _find(objects, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"oci://registry.internal/models/tiny-chat@{_digest(catalog)}"
    assert model["args"] == [
        "--model_name=tiny-chat",
        "--backend=vllm",
        "--max_model_len=8192",
        "--gpu_memory_utilization=0.90",
    ]
    assert model["modelFormat"] == {"name": "huggingface"} and model["runtime"] == "kserve-huggingfaceserver"
    # the list is replaced whole on a custom resource: the base's variables are carried with the offline ones
    assert model["env"][0]["name"] == "HF_TOKEN" and "valueFrom" in model["env"][0]
    assert model["env"][1:] == [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
    ]


def test_init_copy_overlay_with_a_shell_base(tmp_path: Path, cli: Cli) -> None:
    catalog = _with_shell_base(
        tmp_path,
        cli,
        "      - path: serving/overlays/init-copy\n        target: {kind: Deployment, name: raw-vllm}\n"
        "        mode: init-copy\n        drop: {initContainers: [prestage], volumes: [model]}\n",
    )
    cli("patch", "-c", catalog, "--allow-unpushed")
    reference = f"registry.internal/models/tiny-chat@{_digest(catalog)}"
    pod = _pod(render(catalog.parent / "serving" / "overlays" / "init-copy"))
    (init,) = pod["initContainers"]
    assert init["name"] == "modelcar" and init["image"] == reference
    assert init["command"] == ["sh", "-c", "cp -r /models/. /mnt/models/"]
    assert init["volumeMounts"] == [{"name": "modelcar", "mountPath": "/mnt/models"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {"modelcar", "shm"}
    assert volumes["modelcar"] == {"name": "modelcar", "emptyDir": {"sizeLimit": "1Gi"}}
    (vllm,) = pod["containers"]
    assert vllm["args"][:3] == ["/mnt/models", "--served-model-name", "tiny-chat"]
    assert {"name": "modelcar", "mountPath": "/mnt/models", "readOnly": True} in vllm["volumeMounts"]


def test_same_named_base_volume_keeps_only_the_image_source(examples: Path, cli: Cli) -> None:
    deployment = examples / "serving" / "base" / "deployment.yaml"
    text = deployment.read_text().replace(
        "        - name: model\n          persistentVolumeClaim:",
        "        - name: modelcar\n          persistentVolumeClaim:",
    )
    text = text.replace(
        "            - name: model\n              mountPath: /models\n            - name: shm",
        "            - name: modelcar\n              mountPath: /models\n            - name: shm",
    )
    deployment.write_text(text)
    catalog = examples / "catalog.yaml"
    write_catalog(
        catalog,
        catalog.read_text().replace(
            "drop: {initContainers: [prestage], volumes: [model]}", "drop: {initContainers: [prestage]}"
        ),
    )
    cli("patch", "-c", catalog, "--allow-unpushed")
    patch = (examples / "serving" / "overlays" / "raw-vllm" / "modelcar-tiny-chat.yaml").read_text()
    assert "persistentVolumeClaim: null" in patch
    pod = _pod(render(examples / "serving" / "overlays" / "raw-vllm"))
    (volume,) = [v for v in pod["volumes"] if v["name"] == "modelcar"]
    assert set(volume) == {"name", "image"}  # strategic merge alone would have kept the PVC too
    # its mounts went with it: /models is not the read-only image now, in any container
    mounts = [m for c in [*pod["containers"], *pod.get("initContainers", [])] for m in c.get("volumeMounts", [])]
    assert [m["mountPath"] for m in mounts if m["name"] == "modelcar"] == ["/mnt/modelcar"]


def test_second_run_changes_nothing_and_check_reports_drift(examples: Path, cli: Cli) -> None:
    catalog = examples / "catalog.yaml"
    files = sorted(p for p in (examples / "serving").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    result = cli("patch", "-c", catalog, "--allow-unpushed")
    assert result.stdout == "6 files up to date\n"
    assert {p: p.read_bytes() for p in files} == before
    assert cli("patch", "-c", catalog, "--allow-unpushed", "--check").stdout == ""

    (examples / "models" / "tiny-chat" / "config.json").write_text('{"changed": true}\n')
    cli("lock", "-c", catalog, "--update")
    cli("build", "-c", catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--check", code=1)
    stale = sorted(line.removeprefix("stale: ") for line in result.stdout.splitlines())
    overlays = examples / "serving" / "overlays"
    assert stale == sorted(
        str(overlays / o / "modelcar-tiny-chat.yaml") for o in ("multi-gpu", "raw-vllm", "raw-vllm-subpath")
    )
    assert {p: p.read_bytes() for p in files} == before  # --check wrote nothing
    assert "error: 3 files out of step with catalog.lock" in result.stderr
    doc = json.loads(cli("patch", "-c", catalog, "--allow-unpushed", "--check", "--json", code=1).stdout)
    assert doc["error"] == f"3 files out of step with catalog.lock: run `modelcar patch --allow-unpushed -c {catalog}`"


def test_check_says_a_patch_an_older_release_wrote_differs_in_its_header_only(examples: Path, cli: Cli) -> None:
    """Releases before headers named the lock's path wrote `from catalog.lock`: after an upgrade,
    `patch --check` failed the CI gate saying the overlays were out of step with the lock, for a
    comment. It still fails (`patch` would change the file, and the header tells two catalogs'
    patches in one overlay apart), saying that only the header differs."""
    catalog = examples / "catalog.yaml"
    cli("patch", "-c", catalog, "--allow-unpushed")
    patch = examples / "serving" / "overlays" / "raw-vllm" / "modelcar-tiny-chat.yaml"
    current = patch.read_text()
    older = current.replace("from ../../../catalog.lock:", "from catalog.lock:", 1)
    assert older != current
    patch.write_text(older)
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--check", code=1)
    assert result.stdout == f"stale: {patch} (its header only: written by an older modelcar)\n"
    patch.write_text(older.replace("HF_HUB_OFFLINE", "HF_HUB_OFFLINE_X"))
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--check", code=1)
    assert result.stdout == f"stale: {patch}\n"
    patch.write_text(older)
    cli("patch", "-c", catalog, "--allow-unpushed")
    assert patch.read_text() == current


def test_an_overlay_this_user_may_not_write_changes_no_overlay(
    examples: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One overlay directory owned by another user: the overlays written before it had the new
    digest, the others the old one, and the error did not say so."""
    import errno

    from modelcar import fsutil

    catalog = examples / "catalog.yaml"
    cli("patch", "-c", catalog, "--allow-unpushed")
    (examples / "models" / "tiny-chat" / "config.json").write_text('{"changed": true}\n')
    cli("lock", "-c", catalog, "--update")
    cli("build", "-c", catalog)
    files = sorted(p for p in (examples / "serving").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    locked = examples / "serving" / "overlays" / "raw-vllm-subpath"
    create_beside = fsutil.create_beside

    def not_here(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
        if path.parent == locked:  # what root cannot be made to see by chmod
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return create_beside(path, suffix)

    monkeypatch.setattr(fsutil, "create_beside", not_here)
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=1)
    assert f"{locked}: Permission denied (a new modelcar-tiny-chat.yaml is made in it first)" in result.stderr
    assert sorted(p for p in (examples / "serving").rglob("*") if p.is_file()) == files  # no temp file left
    assert {p: p.read_bytes() for p in files} == before
    monkeypatch.setattr(fsutil, "create_beside", create_beside)
    assert "wrote" in cli("patch", "-c", catalog, "--allow-unpushed").stdout


def test_a_directory_where_a_patch_goes_changes_no_overlay(examples: Path, cli: Cli) -> None:
    """The first overlays got their new patch file, the kustomization that names it did not, and
    the run failed on a directory in another overlay: it is found before any file is renamed."""
    catalog = examples / "catalog.yaml"
    (examples / "models" / "tiny-chat" / "config.json").write_text('{"changed": true}\n')
    cli("lock", "-c", catalog, "--update")
    cli("build", "-c", catalog)
    in_the_way = examples / "serving" / "overlays" / "raw-vllm-subpath" / "modelcar-tiny-chat.yaml"
    in_the_way.unlink()
    in_the_way.mkdir()
    files = sorted(p for p in (examples / "serving").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=1)
    assert f"error: {in_the_way}: a directory where the file goes" in result.stderr
    assert sorted(p for p in (examples / "serving").rglob("*") if p.is_file()) == files  # no temp file left
    assert {p: p.read_bytes() for p in files} == before
    in_the_way.rmdir()
    assert "wrote" in cli("patch", "-c", catalog, "--allow-unpushed").stdout


def test_a_check_reads_beside_other_readers_and_waits_for_a_writer(examples: Path) -> None:
    """`patch --check` takes a shared lock on the catalog: checks run together (CI jobs), a patch
    writing the overlays is waited for, and no descriptor open for writing is needed (on NFS an
    exclusive lock needs one: a catalog this user may not write)."""
    import threading

    from modelcar import api
    from modelcar.fsutil import exclusive, shared

    catalog = examples / "catalog.yaml"
    api.patch(catalog, allow_unpushed=True)
    done = threading.Event()

    def check() -> None:
        api.patch(catalog, allow_unpushed=True, check=True)
        done.set()

    with shared(catalog):  # another check at work
        worker = threading.Thread(target=check)
        worker.start()
        assert done.wait(60), "a check waited for another check"
    worker.join()
    done.clear()
    with exclusive(catalog):  # a patch at work
        worker = threading.Thread(target=check)
        worker.start()
        assert not done.wait(0.5)  # it waits for the writer
    assert done.wait(60)
    worker.join()


def test_a_patch_waits_for_another_catalog_s_patch_of_the_same_overlay(examples: Path) -> None:
    """Two catalogs whose models patch one overlay directory each read its kustomization.yaml and
    wrote it back: the last dropped the other's entry (kustomize then ignored its patch). Each
    overlay directory is locked while a run plans and writes its files; a check shares it."""
    import threading

    from modelcar import api
    from modelcar.fsutil import directories_locked

    catalog = examples / "catalog.yaml"
    overlay = examples / "serving" / "overlays" / "multi-gpu"
    for check in (False, True):
        done = threading.Event()

        def run(check: bool = check, done: threading.Event = done) -> None:
            api.patch(catalog, allow_unpushed=True, check=check)
            done.set()

        with directories_locked([overlay]):  # another catalog's patch at work there
            worker = threading.Thread(target=run)
            worker.start()
            assert not done.wait(0.5)  # it waits for it
        assert done.wait(60)
        worker.join()
    done.clear()
    with directories_locked([overlay], share=True):  # another check: no wait
        worker = threading.Thread(target=lambda: (api.patch(catalog, allow_unpushed=True, check=True), done.set()))
        worker.start()
        assert done.wait(60), "a check waited for another check"
    worker.join()


def test_each_yaml_file_is_parsed_once_per_run(examples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlays share their base, and an overlay holds every model's patch: parsed again for each
    model and overlay, 200 models took minutes to patch."""
    from modelcar.catalog import load_catalog
    from modelcar.patch import plan_patches

    parsed: list[str] = []
    load_all = yaml.load_all

    def counting(stream: Any, Loader: Any) -> Any:
        parsed.append(stream if isinstance(stream, str) else stream.read())
        return load_all(parsed[-1], Loader)

    monkeypatch.setattr(yaml, "load_all", counting)
    planned = plan_patches(load_catalog(examples / "catalog.yaml"), allow_unpushed=True)
    assert len(planned) == 6
    base = (examples / "serving" / "base" / "deployment.yaml").read_text()
    assert parsed.count(base) == 1  # three overlays build on it
    assert len(parsed) == len(set(parsed))


def test_a_patch_in_an_overlay_the_catalog_lists_no_more_is_named_and_pruned(examples: Path, cli: Cli) -> None:
    """A model removed from the catalog, or an overlay taken off it: its patch stayed, pinning the
    old image, and `patch --check` said all was well. It may also be a copy of an overlay someone
    made on purpose (a canary): named by --check and by patch, removed only with --prune."""
    catalog = examples / "catalog.yaml"
    overlays = examples / "serving" / "overlays"
    multi = overlays / "multi-gpu"
    canary = overlays / "raw-vllm-canary"
    shutil.copytree(overlays / "raw-vllm", canary)
    text = catalog.read_text()
    start = text.index("      - path: serving/overlays/multi-gpu")
    write_catalog(catalog, text[:start] + text[text.index("      #", start) :])
    orphaned = [multi / "modelcar-tiny-chat.yaml", canary / "modelcar-tiny-chat.yaml"]
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--check", code=1)
    assert result.stdout.splitlines() == [f"orphaned: {path}" for path in orphaned]
    assert "2 patch file(s) written from catalog.lock pin overlays the catalog lists no more" in result.stderr
    assert f"`modelcar patch --prune --allow-unpushed -c {catalog}` removes them" in result.stderr  # this run's options
    assert (
        f"error: 2 patch files the catalog lists no more: run `modelcar patch --prune --allow-unpushed -c {catalog}`"
        in (result.stderr)
    )
    result = cli("patch", "-c", catalog, "--allow-unpushed")
    assert result.stdout == "4 files up to date\n" and "--prune" in result.stderr
    assert all(path.exists() for path in orphaned)  # named, not removed
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--prune")
    assert sorted(result.stdout.splitlines()) == sorted(
        [f"removed {path}" for path in orphaned] + [f"wrote {path.parent / 'kustomization.yaml'}" for path in orphaned]
    )
    assert "modelcar-tiny-chat" not in (multi / "kustomization.yaml").read_text()
    render(multi)  # still builds: nothing names the patch that went
    cli("patch", "-c", catalog, "--allow-unpushed", "--check")
    # another catalog's patch, written from a lock that is there, is not this catalog's to name or remove
    other = examples / "other"
    other.mkdir()
    write_catalog(other / "catalog.yaml", "models: []\n")
    (other / "catalog.lock").write_text("models: {}\n")
    theirs = multi / "modelcar-theirs.yaml"
    theirs.write_text(HEADER.format(lock="../../../other/catalog.lock") + "kind: Deployment\n")
    cli("patch", "-c", catalog, "--allow-unpushed", "--check", "--prune")
    assert theirs.exists()
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--prune", "tiny-chat", code=2)
    assert "--prune works on the whole catalog" in result.stderr


def test_a_patch_cut_off_midway_leaves_every_overlay_building(examples: Path, cli: Cli) -> None:
    """A new patch file is written before the kustomization.yaml that names it (and an old one
    removed after): a write that fails (or a kill) between the two left an overlay that named a
    file not there, and Argo CD could not build it."""
    catalog = examples / "catalog.yaml"
    multi = examples / "serving" / "overlays" / "multi-gpu"
    text = catalog.read_text()
    start = text.index("      - path: serving/overlays/multi-gpu")
    write_catalog(catalog, text[:start] + text[text.index("      #", start) :])
    cli("patch", "-c", catalog, "--allow-unpushed", "--prune")  # the overlay as it was before modelcar
    write_catalog(catalog, text)
    kustomization = (multi / "kustomization.yaml").read_bytes()
    (multi / "modelcar-tiny-chat.yaml").mkdir()  # where the patch goes, something it cannot replace
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=1)
    assert "modelcar-tiny-chat.yaml" in result.stderr
    assert (multi / "kustomization.yaml").read_bytes() == kustomization
    assert not list((examples / "serving").rglob(".*.tmp"))  # no staged file left in the checkout
    (multi / "modelcar-tiny-chat.yaml").rmdir()
    render(multi)
    cli("patch", "-c", catalog, "--allow-unpushed")
    assert b"modelcar-tiny-chat.yaml" in (multi / "kustomization.yaml").read_bytes()
    render(multi)


def test_runs_with_nothing_to_write_still_sweep_what_killed_runs_left(examples: Path, cli: Cli) -> None:
    """Temporary files were swept only by a run that wrote beside them: one retried within the
    grace period and followed by no-op runs kept a partial blob (a weight file's size) in the
    layout, a partial archive, and a temp file in a git checkout's overlay, for good."""
    catalog = examples / "catalog.yaml"
    layout, overlay = examples / ".modelcar" / "oci", examples / "serving" / "overlays" / "raw-vllm"
    archive = examples / "out" / "models[1].tar"  # a name that is a glob pattern of its own
    cli("mirror", "-c", catalog, "--to", f"oci-archive:{archive}")
    left = [
        layout / "blobs" / "sha256" / ".upload.0123456789ab.tmp",
        layout / ".oci-layout.0123456789ab.tmp",
        layout / ".index.json.0123456789ab.tmp",
        archive.parent / f".{archive.name}.0123456789ab.partial",
        overlay / ".modelcar-tiny-chat.yaml.0123456789ab.tmp",
        overlay / ".kustomization.yaml.0123456789ab.tmp",
    ]
    old = time.time() - 3600
    for path in left:
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    assert "(0 written, " in cli("build", "-c", catalog).stderr
    cli("mirror", "-c", catalog, "--to", f"oci-archive:{archive}")
    assert cli("patch", "-c", catalog, "--allow-unpushed").stdout.endswith("files up to date\n")
    assert [path for path in left if path.exists()] == []


def test_an_unpushed_image_and_no_registry_says_to_name_one(examples: Path, cli: Cli) -> None:
    """A catalog with no `registry:`: `--allow-unpushed` said to pass `--allow-unpushed`, and the
    `modelcar push` it offered has no registry to push to either. Nothing is written."""
    catalog = examples / "catalog.yaml"
    write_catalog(
        catalog, "\n".join(line for line in catalog.read_text().splitlines() if not line.startswith("registry:"))
    )
    patches = {p: p.read_bytes() for p in (examples / "serving").rglob("*.yaml")}
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert result.stderr == (
        f"error: {catalog.with_suffix('.lock')}: tiny-chat: built but not pushed, and {catalog} has no `registry:` "
        f"to pin it in: set one and run `modelcar push tiny-chat -c {catalog}` (or pin the digest it will have "
        "there with --allow-unpushed), or pass --registry PREFIX\n"
    )
    assert {p: p.read_bytes() for p in (examples / "serving").rglob("*.yaml")} == patches
    cli("patch", "-c", catalog, "--registry", "registry.internal:5000/models")  # and that does it


def test_patches_pin_a_mirror_s_registry_on_an_air_gapped_side(examples: Path, cli: Cli) -> None:
    """The lock says where the image was pushed on the connected side; across the air gap the same
    digest lives in the mirror `modelcar mirror` seeded: `--registry` pins it there, for every
    overlay, and `--check` and the orphan sweep work the same."""
    catalog = examples / "catalog.yaml"
    digest = _digest(catalog)
    mirror = "registry.internal:5000/models"
    result = cli("patch", "-c", catalog, "--registry", mirror)  # no --allow-unpushed needed: the digest is known
    written = [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines()]
    pins = [path for path in written if path.name == "modelcar-tiny-chat.yaml"]
    assert len(pins) == 3
    for path in pins:
        assert f"{mirror}/tiny-chat@{digest}" in path.read_text() and "localhost:5000" not in path.read_text()
        render(path.parent)
    cli("patch", "-c", catalog, "--registry", mirror, "--check")
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--check", code=1)  # the catalog's registry differs
    assert f"run `modelcar patch --allow-unpushed -c {catalog}`" in result.stderr

    text = catalog.read_text()  # an overlay taken off: its patch, pinning the mirror, is this catalog's orphan
    start = text.index("      - path: serving/overlays/multi-gpu")
    write_catalog(catalog, text[:start] + text[text.index("      #", start) :])
    orphan = examples / "serving" / "overlays" / "multi-gpu" / "modelcar-tiny-chat.yaml"
    result = cli("patch", "-c", catalog, "--registry", mirror)  # named, with the options that find it again
    assert f"`modelcar patch --prune --registry {mirror} -c {catalog}` removes them" in result.stderr
    result = cli("patch", "-c", catalog, "--registry", mirror, "--check", "--prune", code=1)
    assert f"removed {orphan}" not in result.stdout and "run `modelcar patch --prune --registry " in result.stderr
    cli("patch", "-c", catalog, "--registry", mirror, "--prune")
    assert not orphan.exists()
    result = cli("patch", "-c", catalog, "--registry", "Bad/Prefix", code=2)
    assert "registry: 'Bad/Prefix'" in result.stderr


def test_a_copy_that_names_this_lock_by_accident_is_not_an_orphan(examples: Path, cli: Cli) -> None:
    """A patched overlay copied to another depth names, by its relative header, another catalog's
    lock: that catalog must not call it its own (nor --prune delete it); nor one in a directory with
    no kustomization, which --prune could not edit."""
    other = examples / "serving"  # a catalog one level down, with a registry of its own and a lock
    write_catalog(other / "catalog.yaml", "registry: registry.example/other\nmodels:\n  - name: o\n    path: ./o\n")
    (other / "catalog.lock").write_text("models: {}\n")
    copy = examples / "serving" / "overlays" / "x" / "canary"
    shutil.copytree(examples / "serving" / "overlays" / "raw-vllm", copy)  # one level deeper
    assert HEADER.format(lock="../../../../catalog.lock") not in (copy / "modelcar-tiny-chat.yaml").read_text()
    (copy / "modelcar-tiny-chat.yaml").write_text(
        (copy / "modelcar-tiny-chat.yaml").read_text().replace("../../../catalog.lock", "../../catalog.lock", 1)
    )  # now it names serving/catalog.lock, as a copy at that depth would
    cli("patch", "-c", other / "catalog.yaml", "--check", "--prune")
    cli("patch", "-c", other / "catalog.yaml", "--check")
    assert (copy / "modelcar-tiny-chat.yaml").exists()
    bare = examples / "serving" / "overlays" / "bare"
    bare.mkdir()
    shutil.copy(examples / "serving" / "overlays" / "raw-vllm" / "modelcar-tiny-chat.yaml", bare)
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", "--check")


def test_committed_examples_are_current(cli: Cli) -> None:
    cli("patch", "-c", REPO / "examples" / "catalog.yaml", "--allow-unpushed", "--check")


def test_unpushed_needs_the_flag_and_pushed_pins_the_repository(examples: Path, cli: Cli) -> None:
    catalog = examples / "catalog.yaml"
    result = cli("patch", "-c", catalog, code=1)
    assert "tiny-chat: built but not pushed" in result.stderr and "--allow-unpushed" in result.stderr
    lock = yaml.safe_load(catalog.with_suffix(".lock").read_text())
    lock["models"]["tiny-chat"]["image"]["repository"] = "ghcr.io/acme/modelcars/tiny-chat"
    catalog.with_suffix(".lock").write_text(yaml.safe_dump(lock))
    cli("patch", "-c", catalog)
    patch = (examples / "serving" / "overlays" / "raw-vllm" / "modelcar-tiny-chat.yaml").read_text()
    assert f"reference: ghcr.io/acme/modelcars/tiny-chat@{_digest(catalog)}" in patch


def test_patch_names_every_model_it_cannot_pin(examples: Path, cli: Cli) -> None:
    """The first alone was said: CI fixed and ran again once per model."""
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    for name in ("second", "third"):
        text += f"  - name: {name}\n    path: ./models/tiny-chat\n    overlays:\n"
        text += f"      - path: serving/overlays/raw-vllm\n        target: {{kind: Deployment, name: {name}}}\n"
    catalog.write_text(text)
    result = cli("patch", "-c", catalog, "--json", code=1)
    error = json.loads(result.stdout)["error"]
    assert "tiny-chat: built but not pushed" in error
    assert "second is not locked" in error and "third is not locked" in error


def test_the_default_platforms_named_are_the_image_built_without_them(examples: Path, cli: Cli) -> None:
    """`platforms: [linux/amd64, linux/arm64]` (in either order) asks for the image built with no
    `platforms:`: patch pins it, and plan does not send the model to be built again."""
    catalog = examples / "catalog.yaml"
    planned = cli("plan", "-c", catalog, "--changed-only", "--json").stdout  # (built, not pushed: listed)
    served = "    servedName: tiny-chat\n"
    catalog.write_text(catalog.read_text().replace(served, f"{served}    platforms: [linux/arm64, linux/amd64]\n"))
    cli("patch", "-c", catalog, "--allow-unpushed", "--check")
    assert cli("plan", "-c", catalog, "--changed-only", "--json").stdout == planned


@pytest.mark.parametrize(
    ("line", "asks", "recorded"),
    [
        ("    base: registry.example/busybox@sha256:" + "0" * 64, "on registry.example/busybox@sha256:0000", True),
        ("    platforms: [linux/amd64]", "on scratch for linux/amd64: run", True),
        ("    base: registry.example/busybox@sha256:" + "0" * 64, "on registry.example/busybox@sha256:0000", False),
        ("    platforms: [linux/arm64]", "on scratch for linux/arm64: run", False),
    ],
)
def test_an_image_built_otherwise_than_the_catalog_asks_is_not_pinned(
    examples: Path, cli: Cli, line: str, asks: str, recorded: bool
) -> None:
    """`base:` (a shell for kserve and init-copy) or `platforms:` set and not built yet: the lock's
    digest is another image, and a pod pinned to it would lack what the catalog says it has. A lock
    from before bases were recorded cannot say it has the base: not pinned either."""
    catalog = examples / "catalog.yaml"
    if not recorded:
        lock = yaml.safe_load(catalog.with_suffix(".lock").read_text())
        for key in ("base", "platforms"):
            lock["models"]["tiny-chat"]["image"].pop(key, None)
        catalog.with_suffix(".lock").write_text(yaml.safe_dump(lock))
    catalog.write_text(
        catalog.read_text().replace("    servedName: tiny-chat\n", f"    servedName: tiny-chat\n{line}\n")
    )
    patches = {p: p.read_bytes() for p in (examples / "serving").rglob("*.yaml")}
    for check in ([], ["--check"]):
        result = cli("patch", "-c", catalog, "--allow-unpushed", *check, code=1)
        built = "on scratch for the default platforms" if recorded else "on a base and for platforms it does not record"
        assert f"tiny-chat: the image in the lock is built {built}, " in result.stderr
        assert asks in result.stderr and f"run `modelcar build tiny-chat -c {catalog}` first" in result.stderr
    assert {p: p.read_bytes() for p in (examples / "serving").rglob("*.yaml")} == patches  # nothing written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("serving/overlays/raw-vllm", "serving/overlays/nowhere"), "overlays[0] (serving/overlays/nowhere): path: "),
        (
            ("name: raw-vllm}\n        container: vllm", "name: raw-llm}\n        container: vllm"),
            "overlays[0] (serving/overlays/raw-vllm): target: no Deployment named 'raw-llm' in the overlay's base",
        ),
        (
            ("container: vllm", "container: server"),
            "overlays[0] (serving/overlays/raw-vllm): container: no container 'server' in the target (it has: vllm)",
        ),
        (
            ("mode: image-volume\n        drop", "mode: copy\n        drop"),
            "models[0] (tiny-chat): overlays[0].mode: Input should be 'image-volume', 'kserve' or 'init-copy'",
        ),
        (
            (
                "path: serving/overlays/multi-gpu\n        target: {kind: Deployment, name: raw-vllm}\n",
                "path: serving/overlays/init-copy\n        target: {kind: Deployment, name: raw-vllm}\n"
                "        mode: init-copy\n",
            ),
            "overlays[2] (serving/overlays/init-copy): mode: init-copy runs `cp` in the modelcar image, "
            "which needs a shell",
        ),
        (
            (
                "path: serving/overlays/multi-gpu\n        target: {kind: Deployment, name: raw-vllm}\n"
                "        drop: {initContainers: [prestage], volumes: [model]}\n",
                "path: serving/overlays/kserve\n        target: {kind: InferenceService, name: qwen-chat}\n"
                "        mode: kserve\n",
            ),
            "overlays[2] (serving/overlays/kserve): mode: kserve runs KServe's modelcar sidecar",
        ),
        (
            (
                "volumes: [model]}\n      - path: serving/overlays/raw-vllm-subpath",
                "volumes: [data]}\n      - path: serving/overlays/raw-vllm-subpath",
            ),
            "overlays[0] (serving/overlays/raw-vllm): drop.volumes: the target has no volume 'data'",
        ),
    ],
    ids=[
        "no-directory",
        "no-target",
        "no-container",
        "unknown-mode",
        "init-copy-without-base",
        "kserve-without-base",
        "unknown-volume",
    ],
)
def test_errors_name_the_overlay_and_exit_2(examples: Path, cli: Cli, change: tuple[str, str], message: str) -> None:
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    assert change[0] in text
    write_catalog(catalog, text.replace(change[0], change[1], 1))
    before = {p: p.read_bytes() for p in (examples / "serving").rglob("*") if p.is_file()}
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert message in result.stderr
    assert {p: p.read_bytes() for p in (examples / "serving").rglob("*") if p.is_file()} == before


def test_a_mode_that_needs_a_base_is_said_before_a_build_is_asked_for(examples: Path, cli: Cli) -> None:
    """A kserve overlay on a model without `base:`, not built yet: `patch` said to build it, and
    after the build that the mode needs a base (which the build had not had)."""
    catalog = examples / "catalog.yaml"
    old = "path: serving/overlays/multi-gpu\n        target: {kind: Deployment, name: raw-vllm}\n"
    text = catalog.read_text()
    assert old in text
    new = "path: serving/overlays/kserve\n        target: {kind: InferenceService, name: qwen-chat}\n"
    new += "        mode: kserve\n"
    write_catalog(catalog, text.replace(old, new, 1))
    lock = catalog.with_suffix(".lock")
    data = yaml.safe_load(lock.read_text())
    del data["models"]["tiny-chat"]["image"]
    lock.write_text(yaml.safe_dump(data))
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert "mode: kserve runs KServe's modelcar sidecar" in result.stderr and "modelcar build" not in result.stderr


def test_missing_kustomization(examples: Path, cli: Cli) -> None:
    (examples / "serving" / "overlays" / "raw-vllm" / "kustomization.yaml").unlink()
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert "overlays[0] (serving/overlays/raw-vllm): path: no kustomization.yaml in" in result.stderr


def test_unreadable_base_takes_args_from_the_catalog(examples: Path, cli: Cli) -> None:
    overlay = examples / "serving" / "overlays" / "raw-vllm" / "kustomization.yaml"
    overlay.write_text(
        overlay.read_text().replace("  - ../../base", "  - https://github.com/acme/serving//base?ref=v1")
    )
    catalog = examples / "catalog.yaml"
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert "args: the overlay's base cannot be read here (remote base or generator)" in result.stderr
    text = catalog.read_text().replace(
        "container: vllm\n",
        "container: vllm\n        args: [/models/x, --served-model-name, x, --port, '8000']\n",
        1,
    )
    write_catalog(catalog, text)
    # the mounts of a dropped volume cannot be found in a base it cannot read: left, they name no volume
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert "overlays[0] (serving/overlays/raw-vllm): drop.volumes: the overlay's base cannot be read here" in (
        result.stderr
    )
    write_catalog(catalog, text.replace("drop: {initContainers: [prestage], volumes: [model]}", "drop: {}", 1))
    cli("patch", "-c", catalog, "--allow-unpushed")
    patch = yaml.safe_load((overlay.parent / "modelcar-tiny-chat.yaml").read_text().split("\n", 1)[1])
    container = patch["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["/mnt/modelcar/models", "--served-model-name", "tiny-chat", "--port", "8000"]
    # a base HF_HUB_OFFLINE from a configMap would keep its valueFrom beside the value
    assert all(e["valueFrom"] is None and e["value"] == "1" for e in container["env"])
    (volume,) = [v for v in patch["spec"]["template"]["spec"]["volumes"] if v["name"] == "modelcar"]
    assert volume["persistentVolumeClaim"] is None and volume["emptyDir"] is None  # every other source nulled
    assert volume["image"]["reference"].endswith(_digest(catalog))


def _remote_kserve_base(catalog: Path) -> None:
    """The kserve overlay's base as a remote one, which modelcar cannot read."""
    overlay = catalog.parent / "serving" / "overlays" / "kserve" / "kustomization.yaml"
    overlay.write_text(
        overlay.read_text().replace("  - ../../kserve-base", "  - https://github.com/acme/serving//kserve")
    )


def test_unreadable_kserve_base_needs_args_from_the_catalog(tmp_path: Path, cli: Cli) -> None:
    catalog = _with_shell_base(tmp_path, cli, KSERVE)
    _remote_kserve_base(catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert (
        "overlays[0] (serving/overlays/kserve): args: the overlay's base cannot be read here "
        "(remote base or generator); give the predictor model's full argument list as `args:`"
    ) in result.stderr


@pytest.mark.parametrize("extra", [["--tokenizer", "/models/tok"], ["--chat-template=/models/x/chat.jinja"]])
def test_an_argument_into_a_dropped_volume_is_refused(examples: Path, cli: Cli, extra: list[str]) -> None:
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = list(yaml.safe_load_all(base.read_text()))
    (vllm,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    vllm["args"] += extra
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert (
        f"overlays[0] (serving/overlays/raw-vllm): args: {extra[-1]!r} is under /models, where the dropped volume "
        "'model' was mounted"
    ) in result.stderr


def test_a_dropped_volume_where_the_modelcar_mount_goes_is_no_conflict(examples: Path, cli: Cli) -> None:
    """The base mounted its weights at /mnt/models, where the subPath mount goes: the served path
    is under the dropped volume's old mount path, and it is the image's."""
    base = examples / "serving" / "base" / "deployment.yaml"
    base.write_text(base.read_text().replace("mountPath: /models\n", "mountPath: /mnt/models\n"))
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    (container,) = _pod(render(examples / "serving" / "overlays" / "raw-vllm-subpath"))["containers"]
    assert container["args"][0] == "/mnt/models"
    assert [m for m in container["volumeMounts"] if m["mountPath"] == "/mnt/models"] == [
        {"name": "modelcar", "mountPath": "/mnt/models", "subPath": "models", "readOnly": True}
    ]
    # a path there is the image's only if the model has that file (the subPath overlay alone serves
    # /mnt/models: the others serve /mnt/modelcar/models, and refuse both)
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    start, end = (
        text.index("      - path: serving/overlays/raw-vllm\n"),
        text.index("      - path: serving/overlays/raw-vllm-subpath"),
    )
    rest = text[end:]
    write_catalog(catalog, text[:start] + rest[: rest.index("      - path: serving/overlays/multi-gpu")])
    docs = list(yaml.safe_load_all(base.read_text()))
    (vllm,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    vllm["args"] += ["--generation-config", "/mnt/models/generation_config.json"]  # in the model
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cli("patch", "-c", catalog, "--allow-unpushed")
    vllm["args"] += ["--chat-template", "/mnt/models/Qwen2.5-0.5B-Instruct/t.jinja"]  # the old volume's
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert "args: '/mnt/models/Qwen2.5-0.5B-Instruct/t.jinja' is under /mnt/models, where the dropped" in result.stderr


def test_args_that_are_not_a_list_are_refused(examples: Path, cli: Cli) -> None:
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = list(yaml.safe_load_all(base.read_text()))
    (vllm,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    vllm["args"] = "/models/x --port 8000"
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert "overlays[0] (serving/overlays/raw-vllm): the container's args in the base are not a list" in result.stderr


# --- argument editing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["/models/x", "--served-model-name", "old", "--port", "8000"],
            ["/srv", "--served-model-name", "new", "--port", "8000"],
        ),
        (
            ["--model", "/models/x", "--max-model-len", "4096"],
            ["--model", "/srv", "--max-model-len", "4096", "--served-model-name", "new"],
        ),
        (
            ["--port", "8000", "--model=/models/x", "--served-model-name=old"],
            ["--port", "8000", "--model=/srv", "--served-model-name=new"],
        ),
        (
            ["serve", "/models/x", "--served-model-name", "a", "b", "--port", "1"],
            ["serve", "/srv", "--served-model-name", "new", "--port", "1"],
        ),
        (["--port", "8000"], ["/srv", "--port", "8000", "--served-model-name", "new"]),
        ([], ["/srv", "--served-model-name", "new"]),
        (
            ["org/m", "--tokenizer", "org/m", "--port", "1"],
            ["/srv", "--tokenizer", "/srv", "--port", "1", "--served-model-name", "new"],
        ),
        (
            ["--model=org/m", "--tokenizer=org/m", "--served-model-name", "a", "b"],
            ["--model=/srv", "--tokenizer=/srv", "--served-model-name", "new"],
        ),
        (
            ["--tokenizer", "org/other", "--enable-prefix-caching", "--port", "1"],
            [
                "/srv",
                "--tokenizer",
                "org/other",
                "--enable-prefix-caching",
                "--port",
                "1",
                "--served-model-name",
                "new",
            ],
        ),
    ],
    ids=[
        "positional",
        "model-flag",
        "equals",
        "serve-prefix-and-several-names",
        "no-model",
        "empty",
        "tokenizer-follows",
        "tokenizer-follows-equals",
        "another-tokenizer-kept",
    ],
)
def test_edit_vllm_args(args: list[str], expected: list[str]) -> None:
    assert edit_vllm_args(args, "/srv", "new") == expected
    assert edit_vllm_args(expected, "/srv", "new") == expected  # idempotent


@pytest.mark.parametrize("serve", [[], ["serve"]])
def test_a_model_named_after_the_options_is_refused_not_doubled(serve: list[str]) -> None:
    """`--max-model-len 8192 --port 8000 Qwen/...` is a command line vLLM takes; the patch put the
    served path first and kept the old model: two positionals, and vLLM exits."""
    args = [*serve, "--max-model-len", "8192", "--port", "8000", "Qwen/Qwen2.5-0.5B-Instruct"]
    with pytest.raises(PatchError, match=r"name the model after their options \('Qwen/Qwen2.5-0.5B-Instruct'\)"):
        edit_vllm_args(args, "/srv", "new")
    # the words an option takes are not a model: --served-model-name takes all up to the next option
    assert edit_vllm_args([*serve, "--served-model-name", "a", "b", "--port=1", "--x", "y"], "/srv", "new") == [
        *serve,
        "/srv",
        "--served-model-name",
        "new",
        "--port=1",
        "--x",
        "y",
    ]


def test_a_base_naming_the_model_after_its_options_is_refused_naming_the_overlay(examples: Path, cli: Cli) -> None:
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = list(yaml.safe_load_all(base.read_text()))
    (vllm,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    vllm["args"] = [*vllm["args"][1:], vllm["args"][0]]  # the model last, after its options
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    patches = {p: p.read_bytes() for p in (examples / "serving").rglob("modelcar-*.yaml")}
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert "overlays[0] (serving/overlays/raw-vllm): args: the vLLM arguments name the model after" in result.stderr
    assert {p: p.read_bytes() for p in (examples / "serving").rglob("modelcar-*.yaml")} == patches


def test_the_old_api_server_entrypoint_gets_the_model_as_a_flag() -> None:
    assert edit_vllm_args(["--port", "8000"], "/m", "n", positional=False) == [
        "--model",
        "/m",
        "--port",
        "8000",
        "--served-model-name",
        "n",
    ]
    assert edit_vllm_args(["--model=/x", "--port", "8000"], "/m", "n", positional=False)[0] == "--model=/m"


def test_an_api_server_command_makes_the_patch_use_model_flag(examples: Path, cli: Cli) -> None:
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = list(yaml.safe_load_all(base.read_text()))
    (vllm,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    vllm["command"] = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    vllm["args"] = [a for a in vllm["args"] if not a.startswith("/models")]  # no model given: the image's default
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    (container,) = _pod(render(examples / "serving" / "overlays" / "raw-vllm"))["containers"]
    assert container["args"][:2] == ["--model", "/mnt/modelcar/models"]


def test_edit_kserve_args() -> None:
    # a runtime that runs vLLM itself: vLLM's flag, no --model_name
    assert edit_kserve_args(["--served-model-name=qwen", "--port=8080"], "b") == [
        "--served-model-name=b",
        "--port=8080",
    ]
    assert edit_kserve_args(["--model_name=a", "--backend=vllm"], "b") == ["--model_name=b", "--backend=vllm"]
    assert edit_kserve_args(["--model_name", "a"], "b") == ["--model_name", "b"]
    assert edit_kserve_args(["--backend=vllm"], "b") == ["--model_name=b", "--backend=vllm"]


def test_json_output(examples: Path, cli: Cli) -> None:
    doc = json.loads(cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", "--json").stdout)
    assert doc["changed"] is False and doc["changedFiles"] == [] and len(doc["files"]) == 6


def test_patches_key_with_a_comment(examples: Path, cli: Cli) -> None:
    kfile = examples / "serving" / "overlays" / "raw-vllm" / "kustomization.yaml"
    text = kfile.read_text()
    head = text[: text.index("patches:")]
    kfile.write_text(head + "patches: []  # modelcar adds its entry\n")
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    edited = kfile.read_text()
    assert edited.startswith(head + "patches:  # modelcar adds its entry\n  - path: modelcar-tiny-chat.yaml\n")
    render(kfile.parent)  # still renders and validates


def test_an_overlay_of_many_models_parses_only_the_entry_it_edits(monkeypatch: pytest.MonkeyPatch) -> None:
    """One overlay serving 800 models: each model's edit parsed every `patches` item as YAML (19 s
    for the run). Items that do not hold the file's name are passed over as text; the entry is
    still found however a hand wrote it (see below)."""
    import modelcar.kustomize as kustomize
    from modelcar.catalog import Overlay

    overlay = Overlay.model_validate({"path": "o", "target": {"kind": "Deployment", "name": "vllm"}})
    text = "resources:\n  - ../base\n"
    for n in range(50):
        text = kustomize.edit_kustomization(text, f"modelcar-m{n}.yaml", overlay)
    parsed: list[str] = []
    real = kustomize.yaml.load

    def counted(stream: Any, Loader: Any) -> Any:  # yaml.load names it so
        parsed.append(stream)
        return real(stream, Loader=Loader)

    monkeypatch.setattr(kustomize.yaml, "load", counted)
    again = kustomize.edit_kustomization(text, "modelcar-m25.yaml", overlay)
    assert again == text and len(parsed) == 1 and "modelcar-m25.yaml" in parsed[0]


@pytest.mark.parametrize("empty", ["patches: []", "patches: ~", "patches:"])
def test_an_empty_patches_key_becomes_a_block_list(empty: str) -> None:
    from modelcar.catalog import Overlay
    from modelcar.kustomize import edit_kustomization, remove_kustomization_entry

    overlay = Overlay.model_validate({"path": "o", "target": {"kind": "Deployment", "name": "vllm"}})
    text = f"resources:\n  - ../base\n{empty}  # ours\nimages: []\n"
    edited = edit_kustomization(text, "modelcar-m.yaml", overlay)
    assert yaml.safe_load(edited)["patches"] == [
        {"path": "modelcar-m.yaml", "target": {"group": "apps", "kind": "Deployment", "name": "vllm"}}
    ]
    assert edited.startswith("resources:\n  - ../base\npatches:  # ours\n") and edited.endswith("images: []\n")
    assert yaml.safe_load(remove_kustomization_entry(edited, "modelcar-m.yaml"))["patches"] is None  # a comment on it
    # with nothing of the user's on it, the key goes with the last entry (no bare `patches:` left)
    bare = edit_kustomization(f"resources:\n  - ../base\n{empty}\nimages: []\n", "modelcar-m.yaml", overlay)
    assert remove_kustomization_entry(bare, "modelcar-m.yaml") == "resources:\n  - ../base\nimages: []\n"


@pytest.mark.parametrize(
    "entry",
    [
        "  - path: modelcar-m.yaml  # pinned by CI\n    target:\n      kind: Deployment\n      name: old\n",
        "  - path: ./modelcar-m.yaml\n    target:\n      kind: Deployment\n      name: old\n",
        "  - {path: 'modelcar-m.yaml', target: {kind: Deployment, name: old}}\n",
    ],
)
def test_an_entry_written_by_hand_is_found_however_it_is_written(entry: str) -> None:
    """Matched as text, an entry with a comment after its path, `./` before it or in flow style
    was missed: a second entry was added for the same file, and `--prune` removed the file and
    left the entry naming it (an overlay that no longer builds, and `--check` passed)."""
    from modelcar.catalog import Overlay
    from modelcar.kustomize import edit_kustomization, remove_kustomization_entry

    overlay = Overlay.model_validate({"path": "o", "target": {"kind": "Deployment", "name": "vllm"}})
    other = "  - path: theirs.yaml\n"
    text = f"resources:\n  - ../base\npatches:\n{other}{entry}images: []\n"
    edited = edit_kustomization(text, "modelcar-m.yaml", overlay)
    assert yaml.safe_load(edited)["patches"] == [
        {"path": "theirs.yaml"},
        {"path": "modelcar-m.yaml", "target": {"group": "apps", "kind": "Deployment", "name": "vllm"}},
    ]
    assert edit_kustomization(edited, "modelcar-m.yaml", overlay) == edited
    assert yaml.safe_load(remove_kustomization_entry(text, "modelcar-m.yaml"))["patches"] == [{"path": "theirs.yaml"}]


def test_patch_names_unknown_models(examples: Path, cli: Cli) -> None:
    result = cli("patch", "-c", examples / "catalog.yaml", "--check", "no-such-model", code=2)
    assert "no model named 'no-such-model'" in result.stderr


def test_crlf_kustomization_keeps_its_line_endings(examples: Path, cli: Cli) -> None:
    kfile = examples / "serving" / "overlays" / "raw-vllm-subpath" / "kustomization.yaml"
    original = (REPO / "examples" / "serving" / "overlays" / "raw-vllm-subpath" / "kustomization.yaml").read_bytes()
    kfile.write_bytes(original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    assert kfile.read_bytes() == original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # same entry, same CRLF
    assert cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", "--check").stdout == ""


@pytest.mark.parametrize(
    "patch",
    [
        # JSON 6902, as a kustomize user adds a flag
        "  - target: {kind: Deployment, name: raw-vllm}\n    patch: |-\n"
        "      - op: add\n        path: /spec/template/spec/containers/0/args/-\n"
        "        value: --tensor-parallel-size=4\n",
        # strategic merge, inline, the whole list
        "  - patch: |-\n      apiVersion: apps/v1\n      kind: Deployment\n      metadata: {name: raw-vllm}\n"
        "      spec:\n        template:\n          spec:\n            containers:\n"
        "              - name: vllm\n                args: [/models/x, --tensor-parallel-size=4]\n",
        # JSON 6902 under a regular-expression target, as kustomize reads `name`
        "  - target: {kind: Deployment, name: raw-.*}\n    patch: |-\n"
        "      - op: add\n        path: /spec/template/spec/containers/0/args/-\n"
        "        value: --tensor-parallel-size=4\n",
    ],
    ids=["json6902", "strategic-merge", "regex-target"],
)
def test_an_overlay_patch_of_the_args_is_refused_not_lost(examples: Path, cli: Cli, patch: str) -> None:
    kustomization = examples / "serving" / "overlays" / "multi-gpu" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("patches:\n", "patches:\n" + patch, 1))
    render(kustomization.parent)  # kustomize takes the overlay as it is
    before = {p: p.read_bytes() for p in (examples / "serving").rglob("*") if p.is_file()}
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert f"overlays[2] (serving/overlays/multi-gpu): {kustomization}: a patch there sets the args" in result.stderr
    assert "`args:` on this overlay" in result.stderr
    assert {p: p.read_bytes() for p in (examples / "serving").rglob("*") if p.is_file()} == before


def test_a_patch_of_other_fields_or_containers_is_fine(examples: Path, cli: Cli) -> None:
    kustomization = examples / "serving" / "overlays" / "multi-gpu" / "kustomization.yaml"
    other = (
        "  - target: {kind: Deployment, name: raw-vllm}\n    patch: |-\n"
        "      - op: replace\n        path: /spec/template/spec/initContainers/0/command\n"
        '        value: ["python3", "-I", "-c"]\n'
    )
    kustomization.write_text(kustomization.read_text().replace("patches:\n", "patches:\n" + other, 1))
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")  # the init container is not vLLM's


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ('["vllm", "serve", "/models/Qwen2.5-0.5B-Instruct"]', "the container's command names the model"),
        ('["sh", "-c", "vllm serve /models/x --port 8000"]', "the container's command is a shell line"),
        ('["sh", "-c", "exec vllm serve /models/llama \\"$@\\"", "--"]', "the container's command names the model"),
        # login shells, option clusters, launchers in front
        ('["/bin/bash", "-lc", "vllm serve /models/x --port 8000"]', "the container's command is a shell line"),
        ('["sh", "-ec", "exec vllm serve /models/x"]', "the container's command is a shell line"),
        ('["bash", "-o", "pipefail", "-c", "vllm serve /models/x"]', "the container's command is a shell line"),
        ('["/usr/bin/env", "HOME=/tmp", "bash", "-c", "vllm serve /models/x"]', "the container's command is a shell"),
        ('["tini", "--", "sh", "-c", "vllm serve /models/x"]', "the container's command is a shell line"),
        ('["bash", "-euo", "pipefail", "-c", "exec vllm serve /models/x"]', "the container's command is a shell line"),
        ('["bash", "--rcfile", "/etc/rc", "-c", "vllm serve /models/x"]', "the container's command is a shell line"),
        ('["tini", "-s", "sh", "-c", "vllm serve /models/x"]', "the container's command is a shell line"),
        ('["env", "-iu", "HOME", "bash", "-c", "vllm serve /models/x"]', "the container's command is a shell line"),
        ('["env", "-uCUDA_VISIBLE_DEVICES", "sh", "-c", "vllm serve /models/x"]', "the container's command is a shell"),
        ('["bash", "-o", "pipefail"]', "the container's command is a shell (bash -o pipefail) that takes its script"),
        ('["bash", "--rcfile", "/etc/rc"]', "the container's command is a shell (bash --rcfile /etc/rc) that takes"),
        ('["/usr/bin/env", "vllm", "serve", "/models/x"]', "the container's command names the model"),
        # the script is in args, which the patch replaces
        ('["/bin/sh"]', "the container's command is a shell (/bin/sh) that takes its script from `args`"),
        ('["bash", "-l"]', "the container's command is a shell (bash -l) that takes its script from `args`"),
    ],
)
def test_a_command_that_carries_the_model_is_refused(examples: Path, cli: Cli, command: str, message: str) -> None:
    base = examples / "serving" / "base" / "deployment.yaml"
    text = base.read_text()
    assert 'command: ["vllm", "serve"]' in text
    base.write_text(text.replace('command: ["vllm", "serve"]', f"command: {command}", 1))
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert "overlays[0] (serving/overlays/raw-vllm): " + message in result.stderr


def test_kserve_mode_on_another_kind_is_refused_also_when_the_base_is_remote(tmp_path: Path, cli: Cli) -> None:
    rollout = KSERVE.replace("{kind: InferenceService, name: qwen-chat}", "{kind: Rollout, name: qwen-chat}")
    catalog = _with_shell_base(tmp_path, cli, rollout + "        args: []\n")
    _remote_kserve_base(catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert (
        "overlays[0] (serving/overlays/kserve): target.kind: kserve patches a KServe InferenceService, not a Rollout"
        in result.stderr
    )


def test_an_overlay_on_an_overlay_modelcar_patched_is_fine(examples: Path, cli: Cli) -> None:
    layered = examples / "serving" / "overlays" / "layered"
    layered.mkdir()
    (layered / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../raw-vllm\n"
    )
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    anchor = "      - path: serving/overlays/raw-vllm-subpath\n"
    entry = "      - path: serving/overlays/layered\n        target: {kind: Deployment, name: raw-vllm}\n"
    write_catalog(catalog, text.replace(anchor, entry + anchor, 1))
    cli("patch", "-c", catalog, "--allow-unpushed")  # raw-vllm's own modelcar patch is not a conflict
    (container,) = _pod(render(layered))["containers"]
    assert container["args"][0] == "/mnt/modelcar/models"


@pytest.mark.parametrize(
    "script",
    [
        'ulimit -n 65536 && exec vllm serve "$@"',
        # as such wrappers are written in YAML blocks: a comment, a continued line, "${@}", a `;`
        '# serve the model the args name\nexec vllm serve \\\n  --port 8000 "${@}"; echo done\n',
    ],
    ids=["one-line", "comment-continuation"],
)
@pytest.mark.parametrize("shell", [["/bin/sh", "-c"], ["/usr/bin/env", "bash", "-lc"], ["tini", "--", "sh", "-ec"]])
def test_a_shell_wrapper_that_hands_its_arguments_on_is_fine(
    examples: Path, cli: Cli, script: str, shell: list[str]
) -> None:
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = list(yaml.safe_load_all(base.read_text()))
    (vllm,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    vllm["command"] = [*shell, script, "--"]
    base.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    (container,) = _pod(render(examples / "serving" / "overlays" / "raw-vllm"))["containers"]
    assert container["command"][-1] == "--"  # "$@" is the args, after the $0 placeholder
    assert container["args"][0] == "/mnt/modelcar/models"
    assert container["args"][container["args"].index("--served-model-name") + 1] == "tiny-chat"


def test_a_launcher_option_without_its_value_is_no_crash() -> None:
    from modelcar.vllm_args import _program

    assert _program(["env", "-u"]) == []
    assert _program(["env", "-uHOME", "--unset=X", "bash"]) == ["bash"]


def test_a_shell_running_a_script_file_is_left_to_it(examples: Path, cli: Cli) -> None:
    """`bash /scripts/serve.sh` gets the args as "$@": what the script does with them is its own."""
    base = examples / "serving" / "base" / "deployment.yaml"
    text = base.read_text()
    base.write_text(text.replace('command: ["vllm", "serve"]', 'command: ["bash", "/scripts/serve.sh"]', 1))
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    (container,) = _pod(render(examples / "serving" / "overlays" / "raw-vllm"))["containers"]
    assert container["args"][0] == "/mnt/modelcar/models"


def test_an_overlay_on_an_overlay_with_its_own_args_is_refused(examples: Path, cli: Cli) -> None:
    """The overlay beneath has `args:` in the catalog: a patch of the overlay above, made from the
    base as written, would drop them."""
    layered = examples / "serving" / "overlays" / "layered"
    layered.mkdir()
    (layered / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../raw-vllm\n"
    )
    catalog = examples / "catalog.yaml"
    text = catalog.read_text().replace(
        "container: vllm\n", "container: vllm\n        args: [/models/x, --tensor-parallel-size=4]\n", 1
    )
    anchor = "      - path: serving/overlays/raw-vllm-subpath\n"
    entry = "      - path: serving/overlays/layered\n        target: {kind: Deployment, name: raw-vllm}\n"
    write_catalog(catalog, text.replace(anchor, entry + anchor, 1))
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert "overlays[1] (serving/overlays/layered): " in result.stderr
    assert "a patch there sets the args" in result.stderr


def test_a_component_that_patches_the_args_is_refused_not_lost(examples: Path, cli: Cli) -> None:
    component = examples / "serving" / "components" / "prefix-caching"
    component.mkdir(parents=True)
    (component / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\npatches:\n"
        "  - target: {kind: Deployment, name: raw-vllm}\n    patch: |-\n"
        "      - op: add\n        path: /spec/template/spec/containers/0/args/-\n"
        "        value: --enable-prefix-caching\n"
    )
    kustomization = examples / "serving" / "overlays" / "raw-vllm" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "components:\n  - ../../components/prefix-caching\n")
    result = cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", code=2)
    assert f"overlays[0] (serving/overlays/raw-vllm): {component / 'kustomization.yaml'}: a patch there sets" in (
        result.stderr
    )


def _copy_deployment(examples: Path, name: str) -> None:
    """A second Deployment in the base, a copy of raw-vllm under another name."""
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = [d for d in yaml.safe_load_all(base.read_text()) if d]
    second = json.loads(json.dumps(docs[0]))
    second["metadata"]["name"] = name
    base.write_text(yaml.safe_dump_all([*docs, second], sort_keys=False))


def test_one_model_on_two_workloads_of_one_overlay_gets_a_patch_for_each(examples: Path, cli: Cli) -> None:
    _copy_deployment(examples, "raw-vllm-b")
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    anchor = "      - path: serving/overlays/raw-vllm-subpath\n"
    entry = (
        "      - path: serving/overlays/raw-vllm\n        target: {kind: Deployment, name: raw-vllm-b}\n"
        "        drop: {initContainers: [prestage], volumes: [model]}\n"
    )
    write_catalog(catalog, text.replace(anchor, entry + anchor, 1))
    overlay = examples / "serving" / "overlays" / "raw-vllm"
    result = cli("patch", "-c", catalog, "--allow-unpushed")
    assert f"removed {overlay / 'modelcar-tiny-chat.yaml'}" in result.stdout  # the one-target patch of before
    assert sorted(p.name for p in overlay.glob("modelcar-*.yaml")) == [
        "modelcar-tiny-chat-deployment-raw-vllm-b.yaml",
        "modelcar-tiny-chat-deployment-raw-vllm.yaml",
    ]
    assert "modelcar-tiny-chat.yaml" not in (overlay / "kustomization.yaml").read_text()
    deployments = [o for o in render(overlay) if o["kind"] == "Deployment"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["raw-vllm", "raw-vllm-b"]
    for deployment in deployments:
        (vllm,) = deployment["spec"]["template"]["spec"]["containers"]
        assert vllm["args"][0] == "/mnt/modelcar/models", deployment["metadata"]["name"]
    assert cli("patch", "-c", catalog, "--allow-unpushed", "--check").exit_code == 0

    write_catalog(catalog, text.replace(anchor, entry + entry + anchor, 1))
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert "target: Deployment 'raw-vllm-b' in this overlay is listed twice for this model" in result.stderr


def test_two_catalogs_sharing_an_overlay_keep_each_others_patches(examples: Path, cli: Cli) -> None:
    """Each catalog has its own catalog.lock; the patches name theirs by its path from the overlay."""
    _copy_deployment(examples, "raw-vllm-b")
    overlay = examples / "serving" / "overlays" / "raw-vllm"

    def team_b(name: str) -> Path:
        return write_catalog(
            examples / "team-b" / "catalog.yaml",
            "registry: localhost:5000/team-b\n"
            f"models:\n  - name: {name}\n    path: ../models/tiny-chat\n    overlays:\n"
            "      - path: ../serving/overlays/raw-vllm\n        target: {kind: Deployment, name: raw-vllm-b}\n"
            "        drop: {initContainers: [prestage], volumes: [model]}\n",
        )

    other = team_b("beta")
    cli("build", "-c", other)
    cli("patch", "-c", other, "--allow-unpushed")
    cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed")
    assert sorted(p.name for p in overlay.glob("modelcar-*.yaml")) == ["modelcar-beta.yaml", "modelcar-tiny-chat.yaml"]
    assert cli("patch", "-c", other, "--allow-unpushed", "--check").exit_code == 0
    assert cli("patch", "-c", examples / "catalog.yaml", "--allow-unpushed", "--check").exit_code == 0
    assert (
        (overlay / "modelcar-beta.yaml")
        .read_text()
        .startswith("# Written by `modelcar patch` from ../../../team-b/catalog.lock: ")
    )
    # the same model name in both: one file cannot be both catalogs' patch
    other = team_b("tiny-chat")
    cli("build", "-c", other)
    result = cli("patch", "-c", other, "--allow-unpushed", code=2)
    assert "modelcar-tiny-chat.yaml was written from another lock (# Written by `modelcar patch` from " in (
        result.stderr
    )
    assert "two catalogs patch this overlay with a model of the same name" in result.stderr


def test_a_left_patch_with_crlf_line_endings_is_still_known(examples: Path, cli: Cli) -> None:
    """git's autocrlf may turn a patch file's line endings into CRLF on checkout."""
    overlays = examples / "serving" / "overlays"
    for name in ("raw-vllm", "raw-vllm-subpath", "multi-gpu"):
        patch = overlays / name / "modelcar-tiny-chat.yaml"
        patch.write_bytes(patch.read_bytes().replace(b"\n", b"\r\n"))
    catalog = examples / "catalog.yaml"
    write_catalog(catalog, catalog.read_text().replace("  - name: tiny-chat\n", "  - name: renamed\n", 1))
    cli("build", "-c", catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed")
    assert f"removed {overlays / 'raw-vllm' / 'modelcar-tiny-chat.yaml'}" in result.stdout


def test_patch_files_of_before_and_of_a_moved_catalog_are_still_its_own(examples: Path, cli: Cli) -> None:
    """Headers that name the lock by its name alone (before this version), or a lock no longer
    there (the catalog moved), are this catalog's to replace and to remove."""
    overlays = examples / "serving" / "overlays"
    for name in ("raw-vllm", "raw-vllm-subpath", "multi-gpu"):  # as an older modelcar wrote them
        patch = overlays / name / "modelcar-tiny-chat.yaml"
        patch.write_text(patch.read_text().replace("from ../../../catalog.lock:", "from catalog.lock:", 1))
    catalog = examples / "catalog.yaml"
    write_catalog(catalog, catalog.read_text().replace("  - name: tiny-chat\n", "  - name: renamed\n", 1))
    cli("build", "-c", catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed")
    assert f"removed {overlays / 'raw-vllm' / 'modelcar-tiny-chat.yaml'}" in result.stdout

    moved = examples / "conf"  # the catalog and its lock move one directory down
    moved.mkdir()
    text = (
        catalog.read_text()
        .replace("path: ./models/", "path: ../models/")
        .replace("path: serving/", "path: ../serving/")
    )
    write_catalog(moved / "catalog.yaml", text)
    catalog.with_suffix(".lock").rename(moved / "catalog.lock")
    catalog.unlink()
    cli("patch", "-c", moved / "catalog.yaml", "--allow-unpushed")
    assert (
        (overlays / "raw-vllm" / "modelcar-renamed.yaml")
        .read_text()
        .startswith("# Written by `modelcar patch` from ../../../conf/catalog.lock: ")
    )


def test_two_models_that_would_write_one_patch_file_are_refused(examples: Path, cli: Cli) -> None:
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    anchor = "      - path: serving/overlays/raw-vllm-subpath\n"
    second = "      - path: serving/overlays/raw-vllm\n        target: {kind: Deployment, name: raw-vllm-b}\n"
    other = (
        "  - name: tiny-chat-deployment-raw-vllm-b\n    path: ./models/tiny-chat\n    overlays:\n"
        "      - path: serving/overlays/raw-vllm\n        target: {kind: Deployment, name: raw-vllm}\n"
    )
    write_catalog(catalog, text.replace(anchor, second + anchor, 1) + other)
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert (
        "models[1] (tiny-chat-deployment-raw-vllm-b): overlays[0] (serving/overlays/raw-vllm): writes the same "
        "patch file (modelcar-tiny-chat-deployment-raw-vllm-b.yaml) as models[0] (tiny-chat): overlays[1]"
    ) in result.stderr


def test_a_left_patch_in_a_flow_style_kustomization_names_the_file(examples: Path, cli: Cli) -> None:
    catalog = examples / "catalog.yaml"
    kfile = examples / "serving" / "overlays" / "raw-vllm" / "kustomization.yaml"
    kfile.write_text(kfile.read_text().split("patches:")[0] + "patches: [{path: modelcar-tiny-chat.yaml}]\n")
    write_catalog(catalog, catalog.read_text().replace("  - name: tiny-chat\n", "  - name: renamed\n", 1))
    cli("build", "-c", catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed", code=2)
    assert f"error: {kfile}: patches: written in flow style" in result.stderr


def test_a_renamed_model_takes_its_old_patches_with_it(examples: Path, cli: Cli) -> None:
    """The old name's patch files (known by their header) and their entries go; a file of the
    user's own that happens to be named like them stays."""
    catalog = examples / "catalog.yaml"
    overlays = examples / "serving" / "overlays"
    (overlays / "raw-vllm" / "modelcar-notes.yaml").write_text("# my own file\n")
    foreign = overlays / "raw-vllm" / "modelcar-other.yaml"  # another catalog's, in a shared overlay
    foreign.write_text(HEADER.format(lock="../../../other.lock") + "kind: Deployment\n")
    (examples / "other.lock").write_text("models: {}\n")  # that catalog is there
    write_catalog(catalog, catalog.read_text().replace("  - name: tiny-chat\n", "  - name: tiny-chat-v2\n", 1))
    cli("build", "-c", catalog)
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--check", code=1)
    assert f"stale: {overlays / 'raw-vllm' / 'modelcar-tiny-chat.yaml'}" in result.stdout
    result = cli("patch", "-c", catalog, "--allow-unpushed", "--json")
    removed = json.loads(result.stdout)["removedFiles"]
    assert sorted(removed) == sorted(
        str(overlays / o / "modelcar-tiny-chat.yaml") for o in ("raw-vllm", "raw-vllm-subpath", "multi-gpu")
    )
    for name in ("raw-vllm", "multi-gpu"):
        text = (overlays / name / "kustomization.yaml").read_text()
        assert "modelcar-tiny-chat.yaml" not in text and "path: modelcar-tiny-chat-v2.yaml" in text
    assert (overlays / "raw-vllm" / "modelcar-notes.yaml").read_text() == "# my own file\n"
    assert foreign.exists()
    pod = _pod(render(overlays / "multi-gpu"))
    (vllm,) = pod["containers"]
    assert vllm["args"][vllm["args"].index("--served-model-name") + 1] == "tiny-chat"  # servedName: tiny-chat
    assert _find(render(overlays / "multi-gpu"), "Deployment")["spec"]["replicas"] == 4  # its own patch kept
    assert cli("patch", "-c", catalog, "--allow-unpushed", "--check").exit_code == 0


def test_patch_runs_at_once_for_different_models_keep_every_entry(examples: Path, cli: Cli) -> None:
    """One `modelcar patch MODEL` per model at once (a CI matrix): each reads and rewrites the
    overlay's kustomization.yaml; none may drop another's entry."""
    base = examples / "serving" / "base" / "deployment.yaml"
    docs = [d for d in yaml.safe_load_all(base.read_text()) if d]
    names = [f"m{i}" for i in range(6)]
    copies = []
    for name in names:
        copy = json.loads(json.dumps(docs[0]))
        copy["metadata"]["name"] = f"vllm-{name}"
        copies.append(copy)
    base.write_text(yaml.safe_dump_all([*docs, *copies], sort_keys=False))
    catalog = examples / "catalog.yaml"
    models = "".join(
        f"  - name: {name}\n    path: ./models/tiny-chat\n    overlays:\n"
        f"      - path: serving/overlays/raw-vllm\n        target: {{kind: Deployment, name: vllm-{name}}}\n"
        "        drop: {initContainers: [prestage], volumes: [model]}\n"
        for name in names
    )
    write_catalog(catalog, catalog.read_text() + models)
    cli("build", "-c", catalog)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "modelcar", "patch", "-c", str(catalog), "--allow-unpushed", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    entries = yaml.safe_load((examples / "serving" / "overlays" / "raw-vllm" / "kustomization.yaml").read_text())
    listed = {e["path"] for e in entries["patches"]}
    assert {f"modelcar-{name}.yaml" for name in names} <= listed


def test_two_models_patching_one_container_are_refused(examples: Path, cli: Cli) -> None:
    catalog = examples / "catalog.yaml"
    text = catalog.read_text()
    second = (
        "  - name: tiny-two\n    path: ./models/tiny-chat\n    overlays:\n"
        "      - path: serving/overlays/raw-vllm\n        target: {kind: Deployment, name: raw-vllm}\n"
        "        drop: {initContainers: [prestage], volumes: [model]}\n"
    )
    write_catalog(catalog, text + second)
    cli("build", "-c", catalog)
    expected = (
        f"error: {catalog}: models[1] (tiny-two): overlays[0] (serving/overlays/raw-vllm): target: Deployment "
        "'raw-vllm' of this overlay is patched by models[0] (tiny-chat): overlays[0] (serving/overlays/raw-vllm) "
        "too, and one workload serves one model: give each model its own overlay or target\n"
    )
    assert cli("patch", "-c", catalog, "--allow-unpushed", code=2).stderr == expected
    # with its arguments given in the catalog (what the error about another patch once advised), and
    # with neither model's patch written yet: the last one kustomize applied won, with exit 0
    for overlay in (examples / "serving" / "overlays").iterdir():
        for written in overlay.glob("modelcar-*.yaml"):
            written.unlink()
    write_catalog(catalog, text + second + "        args: [serve, /mnt/modelcar/models]\n")
    assert cli("patch", "-c", catalog, "--allow-unpushed", code=2).stderr == expected


def _context(mode: str, files: dict[str, int], env: list[dict[str, object]] | None = None):  # type: ignore[no-untyped-def]
    from modelcar.catalog import ModelSpec, Overlay, Target
    from modelcar.lock import LockedFile, LockedModel
    from modelcar.patch import PatchContext

    base = "registry.example/shell@sha256:" + "e" * 64
    container = {"name": "vllm", "args": ["/models/x", "--port", "8000"], **({"env": env} if env else {})}
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
              "spec": {"template": {"spec": {"containers": [container]}}}}  # fmt: skip
    entry = LockedModel(
        source="hf://o/m", revision="main", commit="c" * 40,
        files=[LockedFile(path=path, size=size, sha256="0" * 64) for path, size in files.items()],
    )  # fmt: skip
    return PatchContext(
        model=ModelSpec(name="m", hf="o/m", base=base),
        entry=entry,
        overlay=Overlay(path="o", target=Target(kind="Deployment", name="d"), mode=mode),  # type: ignore[arg-type]
        where="catalog.yaml: models[0] (m): overlays[0] (o)",
        reference="registry.example/models/m@sha256:" + "f" * 64,
        target=target,
    )


@pytest.mark.parametrize(("files", "limit"), [({"w": 1 << 30}, "2Gi"), ({"w": 900 << 20, "c": 100}, "1Gi")])
def test_init_copy_s_volume_has_room_for_the_model_and_some(files: dict[str, int], limit: str) -> None:
    """The emptyDir the init container copies into: the model's size and a tenth, in whole GiB
    (1 GiB of weights would overflow a 1Gi limit as soon as anything else lands there)."""
    from modelcar.patch import render_patch

    doc = yaml.safe_load(render_patch(_context("init-copy", files)))
    (volume,) = [v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == "modelcar"]
    assert volume["emptyDir"] == {"sizeLimit": limit}


def test_an_offline_variable_the_base_takes_from_elsewhere_is_set_by_value_only() -> None:
    """A base setting HF_HUB_OFFLINE from a ConfigMap: merged, the entry would have both `value`
    and `valueFrom`, which the API server refuses."""
    from modelcar.patch import render_patch

    env = [{"name": "HF_HUB_OFFLINE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "offline"}}}]
    doc = yaml.safe_load(render_patch(_context("image-volume", {"w": 10}, env)))
    (offline,) = [e for e in doc["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "HF_HUB_OFFLINE"]
    assert offline == {"name": "HF_HUB_OFFLINE", "value": "1", "valueFrom": None}
