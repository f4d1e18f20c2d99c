"""modelcar as a library (`modelcar.api`): the commands' work, from a script, against real parts."""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelcar import api, plan
from modelcar.build import BuildFailed
from modelcar.errors import InputError, IntegrityError, NotBuilt, NotLocked, PartialFailure
from tests.fakehub import FakeHub
from tests.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def _example(tmp_path: Path) -> Path:
    """The quick start's catalog and lock (its committed image digest), without the build output."""
    work = tmp_path / "examples"
    shutil.copytree(REPO / "examples", work, ignore=shutil.ignore_patterns(".modelcar"))
    return work / "catalog.yaml"


def test_a_script_locks_builds_pushes_verifies_plans_and_patches(registry: Registry, tmp_path: Path) -> None:
    cat = _example(tmp_path)
    committed = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]["tiny-chat"]["image"]["digest"]
    assert api.lock(cat).locked == []  # pinned already: nothing resolved again

    prefix = f"{registry.host}/{registry.unique_repo()}"
    (built,) = api.build(cat, push=True, registry=prefix)
    assert built.digest == committed  # the same image the command line builds, on any machine
    assert api.plan(cat, changed_only=True, registry=prefix) == []  # the registry holds it now
    assert {name: v.problems for name, v in api.verify(cat, source=prefix).items()} == {"tiny-chat": []}

    info = api.inspect("tiny-chat", catalog=cat)  # where verify would read it: the registry the lock records
    assert info["digest"] == committed and "config.json" in [f["path"] for f in info["files"]]
    assert "FROM scratch" in api.containerfile(cat, "tiny-chat")

    patched = api.patch(cat)
    assert patched.changed and not patched.orphaned
    pins = [f for f in patched.changed if f.content is not None and f.path.name.startswith("modelcar-")]
    assert len(pins) == 3 and all(f"{prefix}/tiny-chat@{committed}" in str(f.content) for f in pins)  # 3 overlays
    assert api.patch(cat, check=True).changed == []

    archive = tmp_path / "models.tar"
    (copied,) = api.mirror(cat, f"oci-archive:{archive}")
    assert (copied.name, copied.digest) == ("tiny-chat", committed) and archive.stat().st_size > 0


def test_library_failures_raise_with_what_the_command_would_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = _example(tmp_path)
    with pytest.raises(InputError, match="give no model names"):
        api.patch(cat, ["tiny-chat"], prune=True)
    with pytest.raises(InputError, match="--registry needs --push"):  # not a build into the layout instead
        api.build(cat, registry="registry.example/models")
    with pytest.raises(InputError, match="--layout is where a build without --push writes"):  # not passed over
        api.build(cat, push=True, layout=tmp_path / "elsewhere")
    result_file = tmp_path / "not-a-dir"
    result_file.write_text("")
    with pytest.raises(OSError) as refused:  # a result that cannot be written: found before the build
        api.build(cat, ["tiny-chat"], result_file=result_file / "r.json")
    assert refused.value.filename == str(result_file) and not (cat.parent / ".modelcar").exists()

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "r.json"))

    monkeypatch.setattr(plan, "write_result", disk_full)
    with pytest.raises(BuildFailed) as failed:  # built, but its result cannot be written: the results come along
        api.build(cat, ["tiny-chat"], result_file=tmp_path / "r.json")
    assert [r.name for r in failed.value.results] == ["tiny-chat"] and failed.value.results[0].digest
    assert str(failed.value).startswith(f"{tmp_path / 'r.json'}: No space left on device")
    monkeypatch.undo()
    weights = cat.parent / "models" / "tiny-chat" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[::-1])  # the same size, other bytes: not what the lock pins
    with pytest.raises(BuildFailed) as failed:
        api.build(cat)
    assert list(failed.value.errors) == ["tiny-chat"] and isinstance(failed.value.errors["tiny-chat"], IntegrityError)
    assert failed.value.results[0].error == str(failed.value.errors["tiny-chat"])


def test_a_script_can_tell_not_locked_and_not_built_from_other_failures(tmp_path: Path) -> None:
    """What to do next differs: lock it, build it, or stop."""
    cat = _example(tmp_path)
    lock_file = cat.with_suffix(".lock")
    with pytest.raises(NotBuilt, match=r"neither in .* nor pushed anywhere"):  # locked and built, elsewhere
        api.inspect("tiny-chat", catalog=cat)
    lock = yaml.safe_load(lock_file.read_text())
    del lock["models"]["tiny-chat"]["image"]
    lock_file.write_text(yaml.safe_dump(lock))
    with pytest.raises(NotBuilt, match="tiny-chat: no image digest in the lock"):
        api.patch(cat)
    # the commands that go on past a model keep each model's error as raised, by name
    for run in (lambda: api.push(cat, registry="127.0.0.1:9/x"), lambda: api.mirror(cat, to=f"oci:{tmp_path / 'm'}")):
        with pytest.raises(PartialFailure) as failed:
            run()
        assert list(failed.value.errors) == ["tiny-chat"] and isinstance(failed.value.errors["tiny-chat"], NotBuilt)
        assert str(failed.value) == f"tiny-chat: {failed.value.errors['tiny-chat']}"
    lock_file.write_text(yaml.safe_dump({**lock, "models": {}}))
    for call in (
        lambda: api.patch(cat),
        lambda: api.containerfile(cat, "tiny-chat"),
        lambda: api.inspect("tiny-chat", catalog=cat),
    ):
        with pytest.raises(NotLocked, match="tiny-chat is not locked"):
            call()


def test_a_remote_s_hub_cache_and_token_are_its_own(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service building for several tenants sets the Hub, cache and token per call; the
    environment (HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN) is the process's, shared by every thread."""
    secret = "hf_" + "tenant" * 6
    fake_hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 64})
    fake_hub.tokens["org/tiny"] = secret
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: only the Remote's Hub answers
    cat = tmp_path / "catalog.yaml"
    cat.write_text("models:\n  - name: tiny\n    hf: org/tiny\n")
    remote = api.Remote(hf_endpoint=fake_hub.url, hf_cache=tmp_path / "tenant-cache", hf_token=secret)
    (built,) = api.build(cat, remote=remote, layout=tmp_path / "oci")
    assert built.digest and f"Bearer {secret}" in fake_hub.auth_headers
    assert list((tmp_path / "tenant-cache" / "models--org--tiny" / "snapshots").iterdir())
    assert not (tmp_path / "hf-cache").exists()  # the environment's cache is not used
    assert secret not in repr(remote)


def test_paths_and_names_are_taken_as_a_script_writes_them(tmp_path: Path) -> None:
    """str paths where Path ones are expected, and one model name alone (not split into letters)."""
    cat = str(_example(tmp_path))
    result_file = str(tmp_path / "results" / "r.json")
    (built,) = api.build(cat, "tiny-chat", result_file=result_file, layout=str(tmp_path / "oci"))
    assert built.digest and Path(result_file).is_file()
    lock, _ = api.merge(cat, result_file)  # one result file, as a str
    assert lock.models["tiny-chat"].image is not None
    assert api.verify(cat, "tiny-chat", source=f"oci:{tmp_path / 'oci'}")["tiny-chat"].problems == []
    assert api.layout_store(cat).root == Path(cat).parent / ".modelcar" / "oci"  # the catalog's path, as a str


def test_an_image_verify_could_not_reach_is_not_called_damaged(tmp_path: Path) -> None:
    """A registry that is down says nothing of the image: a script rebuilding what `damaged` names
    would rebuild every model in an outage."""
    cat = _example(tmp_path)
    remote = api.Remote(retry=api.RetryPolicy(max_retries=0))
    (found,) = api.verify(cat, source="127.0.0.1:9/models", remote=remote).values()
    assert found.problems and not found.read and not found.damaged
    api.build(cat)
    blobs = tmp_path / "examples" / ".modelcar" / "oci" / "blobs" / "sha256"
    weights = max(blobs.iterdir(), key=lambda b: b.stat().st_size)
    weights.write_bytes(b"\0" * weights.stat().st_size)  # read, and wrong
    (found,) = api.verify(cat).values()
    assert found.read and found.damaged


def test_a_library_build_draws_no_bar_it_was_not_asked_for(fake_hub: FakeHub, tmp_path: Path) -> None:
    """On a terminal (a notebook, a script run by hand), api.build with no Progress draws nothing:
    not modelcar's bars, nor huggingface_hub's one per file."""
    import pty

    from modelcar.hub import _quiet_bars

    if not _quiet_bars():
        pytest.skip(
            "this huggingface_hub's hf_hub_download takes no tqdm_class: it heeds HF_HUB_DISABLE_PROGRESS_BARS only"
        )
    fake_hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": b"\1" * 4096})
    cat = tmp_path / "catalog.yaml"
    cat.write_text("models:\n  - name: tiny\n    hf: org/tiny\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"} | {
        "HF_HUB_CACHE": str(tmp_path / "hf")
    }
    script = f"from modelcar import api\n(built,) = api.build({str(cat)!r})\nprint('built', built.digest)\n"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    seen = b""
    with contextlib.suppress(OSError):  # EIO once the child is gone
        while chunk := os.read(controller, 65536):
            seen += chunk
    os.close(controller)
    assert proc.wait(timeout=120) == 0, seen
    assert re.fullmatch(rb"built sha256:[0-9a-f]{64}\r\n", seen), seen  # nothing else on the terminal


def test_every_type_a_function_returns_is_a_name_of_api() -> None:
    """A script annotates with `api.ModelResult`, not the module it happens to live in; the types
    load when first asked for, so `import modelcar.api` stays light."""
    returned: set[str] = set()
    for name, fn in vars(api).items():
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", None) == api.__name__:
            annotation = inspect.signature(fn).return_annotation
            if isinstance(annotation, str):
                returned |= set(re.findall(r"\b[A-Z]\w*", annotation))
    assert {"ModelResult", "CopyResult", "Verified", "PlanEntry", "LockResult"} <= returned
    missing = sorted(n for n in returned if not isinstance(getattr(api, n, None), type) and n != "Any")
    assert missing == []
    code = (
        "import sys; from modelcar import api; assert 'modelcar.build' not in sys.modules; "
        "from modelcar.api import ModelResult; from modelcar.build import ModelResult as M; assert ModelResult is M"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
