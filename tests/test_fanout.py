"""CI fan-out simulated here: plan, N concurrent workers (`build --index i --result`), merge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cli, write_catalog
from tests.fakehub import FakeHub
from tests.registry import Registry

A = {"config.json": b'{"a": 1}\n', "tokenizer.json": b'{"t": 1}\n', "model.safetensors": b"A" * 300_000}
B = {"config.json": b'{"b": 2}\n', "model.safetensors": b"B" * 200_000}


def _catalog(registry: str) -> str:
    return (
        f"registry: {registry}\n"
        "models:\n"
        "  - name: alpha\n    hf: org/a\n"
        "  - name: alpha-configs\n    hf: org/a\n    include: ['*.json']\n"
        "  - name: beta\n    hf: org/b\n"
    )


def test_fan_out_and_merge_equal_one_build(cli: Cli, fake_hub: FakeHub, registry: Registry, tmp_path: Path) -> None:
    fake_hub.add_repo("org/a", A)
    fake_hub.add_repo("org/b", B)
    prefix = f"{registry.host}/{registry.unique_repo('fanout')}"

    # The plan job: lock, then the matrix. Then one worker per model, each on its own "machine".
    fanout = write_catalog(tmp_path / "repo" / "catalog.yaml", _catalog(prefix))
    cli("lock", "-c", fanout)
    matrix = json.loads(cli("plan", "-c", fanout, "--format", "github-matrix").stdout)
    assert [(m["index"], m["model"]) for m in matrix["include"]] == [(0, "alpha"), (1, "alpha-configs"), (2, "beta")]
    assert all(len(m["commit"]) == 40 and m["bytes"] > 0 for m in matrix["include"])
    fake_hub.requests.clear()
    workers = []
    for item in matrix["include"]:
        checkout = tmp_path / f"worker-{item['index']}"
        shutil.copytree(tmp_path / "repo", checkout)
        env = {
            **os.environ,
            "HF_HUB_CACHE": str(checkout / "hf-cache"),
            "MODELCAR_CACHE": str(checkout / "layer-cache"),
        }
        cmd = [
            sys.executable,
            "-m",
            "modelcar",
            "build",
            "-c",
            str(checkout / "catalog.yaml"),
            "--push",
            "--index",
            str(item["index"]),
            "--result",
            str(tmp_path / f"result-{item['model']}.json"),
        ]
        workers.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outputs
    for worker in range(3):  # the shared lock of each checkout was not touched by its worker
        assert (tmp_path / f"worker-{worker}" / "catalog.lock").read_bytes() == fanout.with_suffix(".lock").read_bytes()

    # Each worker fetched each file it needs once: alpha and alpha-configs share org/a's JSON files.
    gets = [p.split("/resolve/", 1)[1] for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p]
    assert sorted(g.split("/", 2)[-1] for g in gets if "model.safetensors" in g) == ["model.safetensors"] * 2
    assert max(gets.count(g) for g in gets) <= 2

    results = sorted(tmp_path.glob("result-*.json"))
    result = cli("merge", "-c", fanout, *results)
    assert "updated from 3 results" in result.stdout
    single = write_catalog(tmp_path / "single" / "catalog.yaml", _catalog(prefix))
    cli("build", "-c", single, "--push")  # one machine building everything
    assert fanout.with_suffix(".lock").read_bytes() == single.with_suffix(".lock").read_bytes()  # byte for byte

    # A retried worker's duplicate is fine; a conflicting result is an error naming both files.
    cli("merge", "-c", fanout, *results, results[0])
    doc = json.loads(results[0].read_text())
    doc["entry"]["image"]["digest"] = "sha256:" + "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    err = cli("merge", "-c", fanout, results[0], bad, code=2).stderr
    assert f"{doc['model']}: conflicting results: {results[0]}" in err and str(bad) in err


def test_changed_only_lists_exactly_the_changed_models(
    cli: Cli, fake_hub: FakeHub, registry: Registry, tmp_path: Path
) -> None:
    fake_hub.add_repo("org/a", A)
    fake_hub.add_repo("org/b", B)
    prefix = f"{registry.host}/{registry.unique_repo('changed')}"
    cat = write_catalog(tmp_path / "catalog.yaml", _catalog(prefix))
    cli("build", "-c", cat, "--push")
    assert json.loads(cli("plan", "-c", cat, "--changed-only").stdout) == []

    fake_hub.add_repo("org/b", {**B, "config.json": b'{"b": 3}\n'})  # a new commit of beta's repo
    cli("lock", "-c", cat, "--update")
    write_catalog(cat, cat.read_text().replace("include: ['*.json']", "include: ['config.json']"))
    cli("lock", "-c", cat)
    changed = json.loads(cli("plan", "-c", cat, "--changed-only").stdout)
    assert [(e["index"], e["model"]) for e in changed] == [(1, "alpha-configs"), (2, "beta")]


def test_changed_only_asks_the_registry_as_a_push_does(
    cli: Cli, fake_hub: FakeHub, registry: Registry, tmp_path: Path
) -> None:
    """A HEAD of the index was all plan asked: a platform's manifest deleted under it (GHCR's
    clean-up of untagged versions) or a tag moved, and nothing rebuilt it."""
    fake_hub.add_repo("org/a", A)
    fake_hub.add_repo("org/b", B)
    run = registry.unique_repo("asked")
    cat = write_catalog(tmp_path / "catalog.yaml", _catalog(f"{registry.host}/{run}"))
    cli("build", "-c", cat, "--push")
    assert json.loads(cli("plan", "-c", cat, "--changed-only").stdout) == []
    lock = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    _, _, index = registry.request("GET", f"/v2/{run}/beta/manifests/{lock['beta']['image']['digest']}", headers=accept)
    amd64 = next(m["digest"] for m in json.loads(index)["manifests"] if m["platform"]["architecture"] == "amd64")
    status, _, _ = registry.request("DELETE", f"/v2/{run}/beta/manifests/{amd64}")
    assert status == 202
    assert [e["model"] for e in json.loads(cli("plan", "-c", cat, "--changed-only").stdout)] == ["beta"]
    cli("build", "-c", cat, "--push", "beta")  # puts it back
    assert json.loads(cli("plan", "-c", cat, "--changed-only").stdout) == []
    # alpha's commit tag moved onto one of its own platform manifests: another digest
    tag = lock["alpha"]["commit"][:12]
    _, _, mine = registry.request(
        "GET", f"/v2/{run}/alpha/manifests/{lock['alpha']['image']['digest']}", headers=accept
    )
    child = json.loads(mine)["manifests"][0]
    _, _, body = registry.request(
        "GET", f"/v2/{run}/alpha/manifests/{child['digest']}", headers={"Accept": child["mediaType"]}
    )
    status, _, _ = registry.request(
        "PUT", f"/v2/{run}/alpha/manifests/{tag}", body=body, headers={"Content-Type": child["mediaType"]}
    )
    assert status == 201
    assert [e["model"] for e in json.loads(cli("plan", "-c", cat, "--changed-only").stdout)] == ["alpha"]


def test_changed_only_lists_a_local_model_whose_files_changed_since_its_lock(
    cli: Cli, registry: Registry, tmp_path: Path
) -> None:
    """A local model edited in git without `lock --update`: plan --changed-only listed nothing, so a
    fan-out never built it (the build would have said the files no longer match the lock). Listed
    where its build would fail or change something, not for a file the build leaves out."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prefix = f"{registry.host}/{registry.unique_repo('local')}"
    cat = write_catalog(tmp_path / "catalog.yaml", f"registry: {prefix}\nmodels:\n  - name: ft\n    path: ./m\n")
    cli("build", "-c", cat, "--push")
    assert json.loads(cli("plan", "-c", cat, "--changed-only").stdout) == []
    # A file added: the build leaves it out and says `lock --update` takes it in, changing nothing;
    # listed for it, the model was built to no change in every plan after. Plan says so instead.
    (model / "generation_config.json").write_text('{"t": 0.7}')
    result = cli("plan", "-c", cat, "--changed-only")
    assert json.loads(result.stdout) == []
    assert "1 file the lock does not list, not in the image (generation_config.json)" in result.stderr
    cli("lock", "-c", cat, "--update")
    assert [e["model"] for e in json.loads(cli("plan", "-c", cat, "--changed-only").stdout)] == ["ft"]
    cli("build", "-c", cat, "--push")
    assert json.loads(cli("plan", "-c", cat, "--changed-only").stdout) == []
    (model / "generation_config.json").unlink()  # a file gone
    assert [e["model"] for e in json.loads(cli("plan", "-c", cat, "--changed-only").stdout)] == ["ft"]
    (model / "generation_config.json").write_text('{"t": 0.7}')
    (model / "config.json").write_text('{"x": 1}')  # a size changed
    assert [e["model"] for e in json.loads(cli("plan", "-c", cat, "--changed-only").stdout)] == ["ft"]
    result = cli("build", "-c", cat, "--push", code=2)
    assert "does not match the lock" in result.stderr


def test_k8s_job_and_workflow_use_existing_commands(cli: Cli) -> None:
    repo = Path(__file__).resolve().parent.parent
    commands = set()
    for line in cli("--help").stdout.splitlines():
        parts = line.strip("│ ").split()
        if parts and parts[0].isalpha() and parts[0].islower():
            commands.add(parts[0])
    workflow = yaml.safe_load((repo / "examples" / "ci" / "github-actions.yaml").read_text())
    used = set()
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            words = str(step.get("run", "")).split()
            used |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "modelcar"}
    assert used and used <= commands, used - commands
    assert {"plan", "build", "merge", "patch"} <= used  # examples/ci/k8s-job.yaml: test_plan renders it


def test_ci_logs_and_github_step_summary(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add_repo("org/a", A)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: alpha\n    hf: org/a\n")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    first = cli("build", "-c", cat, "--json")
    second = cli("build", "-c", cat, "--json")
    digest = json.loads(first.stdout)["models"][0]["digest"]
    assert "alpha: " + digest + ": 1 layer (1 written, 0 already there)" in first.stderr
    assert "alpha: " + digest + ": 1 layer (0 written, 1 already there)" in second.stderr
    assert json.loads(second.stdout)["models"][0]["layersReused"] == 1
    table = summary.read_text()
    assert table.count("| model | commit | digest | bytes | seconds | layers written / already there |") == 2
    assert f"| alpha | `{json.loads(first.stdout)['models'][0]['commit'][:12]}` | `{digest}` |" in table
    assert table.rstrip().endswith("| 0 / 1 |")

    # a summary path the job's container does not have: the build stands, its document printed
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "not-mounted" / "summary.md"))
    third = cli("build", "-c", cat, "--json")
    assert json.loads(third.stdout)["models"][0]["digest"] == digest
    assert f"GITHUB_STEP_SUMMARY: no job summary written: {tmp_path / 'not-mounted' / 'summary.md'}: " in third.stderr


def test_a_worker_given_its_model_by_name_refuses_another_at_its_index(cli: Cli, tmp_path: Path) -> None:
    """A catalog changed between the plan and a worker (a Job's ConfigMap made anew while its pods
    start): `--index 1` built whatever model is there now, and merge took it. With the plan's name
    for it, the worker says so instead (exit 2)."""
    for name in ("m", "o"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model": name}))
    cat = write_catalog(
        tmp_path / "catalog.yaml", "models:\n  - name: first\n    path: ./m\n  - name: second\n    path: ./o\n"
    )
    result = cli("build", "-c", cat, "--index", "1", "first", code=2)
    assert result.stderr == (
        f"error: {cat}: --index 1 is 'second' in this catalog, not 'first': the catalog changed since the plan "
        "that named it; plan again\n"
    )
    assert "second" in cli("build", "-c", cat, "--index", "1", "second", "--dry-run").stdout
