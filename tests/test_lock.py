"""`modelcar lock`: commits and file digests from the (fake) Hub through the real huggingface_hub."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cli, write_catalog
from tests.fakehub import FakeHub, git_oid

WEIGHTS = bytes(range(256)) * 64  # 16 KiB, stored as LFS by the fake Hub
FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "tokenizer.json": b'{"version": "1.0"}\n',
    "model.safetensors": WEIGHTS,
    "original/consolidated.pth": b"p" * 4096,
    "README.md": b"# tiny\n",
}
CATALOG = """\
defaults:
  include: ["*.json", "*.safetensors"]
  exclude: ["original/**"]
models:
  - name: tiny
    hf: org/tiny
"""


def _lock(path: Path) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_lock_pins_commit_and_files_without_downloading_weights(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    commit = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    result = cli("lock", "-c", cat)
    assert "tiny  hf://org/tiny  " + commit[:12] in result.stdout
    lock = yaml.safe_load((tmp_path / "catalog.lock").read_text())
    entry = lock["models"]["tiny"]
    assert entry["source"] == "hf://org/tiny"
    assert entry["revision"] == "main"
    assert entry["commit"] == commit
    assert entry["files"] == [
        {"path": p, "size": len(FILES[p]), "sha256": _sha(FILES[p])}
        for p in ("config.json", "model.safetensors", "tokenizer.json")
    ]
    # LFS files are listed from the tree; only the small git-stored files are fetched.
    assert fake_hub.count("GET", "/model.safetensors") == 0
    assert fake_hub.count("GET", "/config.json") == 1


def test_entries_that_share_a_repo_ask_the_hub_once(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A catalog lists a repo under several names (other tags, other file selections): each
    question goes to the Hub once per run, not once per entry (the requests that earn a 429)."""
    tiny = fake_hub.add_repo("org/tiny", FILES)
    other = fake_hub.add_repo("org/other", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    entries = "".join(
        f"  - name: {name}\n    hf: {repo}\n" + ("    include: ['*.json']\n" if name.endswith("json") else "")
        for name, repo in (("t", "org/tiny"), ("t-json", "org/tiny"), ("o", "org/other"), ("o-json", "org/other"))
    )
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG.split("models:")[0] + "models:\n" + entries)
    cli("lock", "-c", cat)
    asked = [p for m, p in fake_hub.requests if m == "GET"]
    assert sorted(p.split("?")[0] for p in asked if "/revision/" in p or "/tree/" in p) == [
        "/api/models/org/other/revision/main",
        f"/api/models/org/other/tree/{other}",
        "/api/models/org/tiny/revision/main",
        f"/api/models/org/tiny/tree/{tiny}",
    ]
    assert fake_hub.count("GET", "/config.json") == 2  # once per repo
    lock = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]
    assert [f["path"] for f in lock["t-json"]["files"]] == ["config.json", "tokenizer.json"]
    assert [f["path"] for f in lock["t"]["files"]] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert lock["t"]["commit"] == lock["t-json"]["commit"] == tiny and lock["o"]["commit"] == other


def test_a_new_commit_asks_the_hub_only_for_the_small_files_it_changed(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """Small files are hashed for the lock, so each would cost a request per new commit; those the
    HF cache holds from the last commit (under their git blob id) are linked and hashed locally."""
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    new_config = b'{"model_type": "qwen3"}\n'
    commit = fake_hub.add_repo("org/tiny", {**FILES, "config.json": new_config})
    fake_hub.requests.clear()
    cli("lock", "-c", cat, "--update")
    asked = sorted({p.split("/resolve/", 1)[1].split("/", 1)[1] for _, p in fake_hub.requests if "/resolve/" in p})
    assert asked == ["config.json"]
    entry = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]
    assert entry["commit"] == commit
    assert {f["path"]: f["sha256"] for f in entry["files"]} == {
        "config.json": _sha(new_config),
        "model.safetensors": _sha(WEIGHTS),
        "tokenizer.json": _sha(FILES["tokenizer.json"]),
    }
    snapshot = tmp_path / "hf-cache" / "models--org--tiny" / "snapshots" / commit
    assert (snapshot / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]

    # A cached blob whose bytes are not what its name says is not trusted: the lock takes the
    # sha256 the last commit's entry gives the same git blob (not read here), and the build, which
    # checks what it reads against the lock, fetches it again.
    newer = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "gemma"}\n'})
    (snapshot / "tokenizer.json").resolve().write_bytes(b'{"version": "9.9"}\n')
    fake_hub.requests.clear()
    cli("lock", "-c", cat, "--update")
    assert fake_hub.count("GET", "/tokenizer.json") == 0
    entry = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]
    assert entry["commit"] == newer
    assert {f["path"]: f["sha256"] for f in entry["files"]}["tokenizer.json"] == _sha(FILES["tokenizer.json"])
    assert "tokenizer.json: sha256 mismatch, downloading again" in cli("build", "-c", cat).stderr
    assert fake_hub.count("GET", "/tokenizer.json") == 1
    assert cli("verify", "-c", cat).stdout == "tiny  ok\n"


def test_lock_is_deterministic_and_checkout_independent(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    a = write_catalog(tmp_path / "a" / "catalog.yaml", CATALOG)
    cli("lock", "-c", a)
    first = (tmp_path / "a" / "catalog.lock").read_bytes()
    result = cli("lock", "-c", a, "--update")
    assert "unchanged" in result.stdout
    assert (tmp_path / "a" / "catalog.lock").read_bytes() == first

    shutil.rmtree(tmp_path / "hf-cache")
    b = write_catalog(tmp_path / "elsewhere" / "deep" / "catalog.yaml", CATALOG)
    cli("lock", "-c", b)
    assert (tmp_path / "elsewhere" / "deep" / "catalog.lock").read_bytes() == first
    assert str(tmp_path).encode() not in first


def test_pins_stay_unless_update(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    old = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    new = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    assert new != old
    cli("lock", "-c", cat)
    assert yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]["commit"] == old
    result = cli("lock", "-c", cat, "--update", "--json")
    assert '"changed": true' in result.stdout
    assert yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]["commit"] == new


def test_update_asks_the_hub_nothing_for_a_model_pinned_to_a_commit(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    commit = fake_hub.add_repo("org/tiny", FILES)
    pinned = CATALOG.replace("hf: org/tiny", f"hf: org/tiny\n    revision: {commit}")
    cat = write_catalog(tmp_path / "catalog.yaml", pinned)
    cli("lock", "-c", cat)
    first = (tmp_path / "catalog.lock").read_bytes()
    assert yaml.safe_load(first)["models"]["tiny"]["commit"] == commit
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})  # main moves on
    fake_hub.requests.clear()
    result = cli("lock", "-c", cat, "--update")
    assert "unchanged" in result.stdout
    assert fake_hub.requests == []
    assert (tmp_path / "catalog.lock").read_bytes() == first


def test_catalog_change_relocks_that_entry(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    write_catalog(cat, CATALOG.replace('["*.json", "*.safetensors"]', '["*.json"]'))
    cli("lock", "-c", cat)
    files = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]["files"]
    assert [f["path"] for f in files] == ["config.json", "tokenizer.json"]


def test_a_new_file_selection_keeps_the_pin(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """Pins stay unless --update (DESIGN section 2): editing include or exclude re-lists the files
    at the pinned commit; it moved the pin to the branch's newest commit, an upgrade unasked."""
    old = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n', "extra.json": b"{}"})
    write_catalog(cat, CATALOG.replace('["*.json", "*.safetensors"]', '["*.json"]'))
    before = len(fake_hub.requests)
    cli("lock", "-c", cat)
    entry = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]
    assert entry["commit"] == old
    assert entry["files"] == [
        {"path": p, "size": len(FILES[p]), "sha256": _sha(FILES[p])} for p in ("config.json", "tokenizer.json")
    ]
    assert not [p for _, p in fake_hub.requests[before:] if "/revision/" in p]  # the branch is not asked
    cli("lock", "-c", cat, "--update")
    assert yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]["commit"] != old


def test_a_new_exclude_lists_the_files_again_at_the_pin(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    old = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    write_catalog(cat, CATALOG.replace('exclude: ["original/**"]', 'exclude: ["original/**", "tokenizer.json"]'))
    cli("lock", "-c", cat)
    entry = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]
    assert (entry["commit"], entry["exclude"]) == (old, ["original/**", "tokenizer.json"])
    assert [f["path"] for f in entry["files"]] == ["config.json", "model.safetensors"]


def test_a_new_revision_moves_the_pin_to_what_it_names(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """`revision:` edited in the catalog is the user asking for that commit: no --update needed."""
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    new = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    write_catalog(cat, CATALOG + f"    revision: {new}\n")
    cli("lock", "-c", cat)
    entry = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["tiny"]
    assert (entry["revision"], entry["commit"]) == (new, new)


def test_git_and_cache_metadata_of_a_local_model_never_ship(cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "m"
    for rel, data in {
        "config.json": b"{}",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        ".git/HEAD": b"ref: refs/heads/main\n",
        ".cache/huggingface/download/config.json.metadata": b"x",
    }.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_bytes(data)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    files = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["m"]["files"]
    assert [f["path"] for f in files] == ["config.json"]


def test_lock_json_says_which_entries_it_resolved(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    first = json.loads(cli("lock", "-c", cat, "--json").stdout)
    again = json.loads(cli("lock", "-c", cat, "--json").stdout)
    assert [m["locked"] for m in first["models"]] == [True] and first["changed"] is True
    assert [m["locked"] for m in again["models"]] == [False] and again["changed"] is False
    # --update asks again: resolved (`locked`), to the same pin (not `moved`), said "pinned"
    updated = cli("lock", "-c", cat, "--update", "--json").stdout
    assert [(m["locked"], m["moved"]) for m in json.loads(updated)["models"]] == [(True, False)]
    assert cli("lock", "-c", cat, "--update").stdout.splitlines()[0].endswith("  pinned")
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"new": 1}'})
    moved = json.loads(cli("lock", "-c", cat, "--update", "--json").stdout)
    assert [(m["locked"], m["moved"]) for m in moved["models"]] == [(True, True)] and moved["changed"] is True
    assert first["models"][0]["moved"] is True  # pinned anew


def test_two_writers_of_one_lock_keep_each_other_s_entries(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds of different models from one checkout at once: each folds its entries into the lock
    as it is on disk, under the lock's file lock; without it the last writer's read wins."""
    import threading

    from modelcar import lock as lock_module
    from modelcar.catalog import load_catalog
    from modelcar.lock import LockedFile, LockedModel, read_lock, save_entries

    cat = load_catalog(
        write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    hf: o/a\n  - name: b\n    hf: o/b\n")
    )
    read = lock_module.read_lock

    def slow_read(path: Path) -> lock_module.Lock:
        found = read(path)
        time.sleep(0.3)  # both writers have read before either writes, unless one waits for the other
        return found

    monkeypatch.setattr(lock_module, "read_lock", slow_read)

    def save(name: str) -> None:
        entry = LockedModel(source=f"hf://o/{name}", revision="main", commit="c" * 40, files=[
            LockedFile(path="config.json", size=2, sha256="d" * 64)
        ])  # fmt: skip
        save_entries(cat, {name: entry})

    threads = [threading.Thread(target=save, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(read_lock(cat.lock_file).models) == ["a", "b"]


def test_a_renamed_model_keeps_its_pin(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """Renaming an entry moved it to the branch's newest commit without --update."""
    old = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("build", "-c", cat)
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    write_catalog(cat, CATALOG.replace("name: tiny", "name: tiny-chat"))
    cli("build", "-c", cat)
    lock = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]
    assert list(lock) == ["tiny-chat"] and lock["tiny-chat"]["commit"] == old
    assert lock["tiny-chat"]["image"]["digest"]  # its own image (the title names it), built
    cli("verify", "-c", cat)


def test_a_renamed_models_pin_survives_another_model_locked_first(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    old = fake_hub.add_repo("org/tiny", FILES)
    fake_hub.add_repo("org/other", FILES)
    two = CATALOG + "  - name: other\n    hf: org/other\n"
    cat = write_catalog(tmp_path / "catalog.yaml", two)
    cli("lock", "-c", cat)
    fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    write_catalog(cat, two.replace("name: tiny", "name: tiny-chat"))
    cli("lock", "-c", cat, "other", "--update")  # another model, written first: the old entry stays
    assert sorted(yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]) == ["other", "tiny"]
    cli("lock", "-c", cat)
    models = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]
    assert sorted(models) == ["other", "tiny-chat"] and models["tiny-chat"]["commit"] == old


def test_renames_that_cannot_be_told_apart_are_locked_afresh(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """Two entries of one repo@main pinned at two commits, both renamed: which old pin is whose is a
    guess (the first in name order went to both, one of them moving back)."""
    first = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG.replace("name: tiny", "name: a"))
    cli("lock", "-c", cat)
    second = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen2"}\n'})
    write_catalog(cat, CATALOG.replace("name: tiny", "name: a") + "  - name: b\n    hf: org/tiny\n")
    cli("lock", "-c", cat)
    assert {n: e["commit"] for n, e in yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"].items()} == {
        "a": first,
        "b": second,
    }
    newest = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "gemma"}\n'})
    write_catalog(cat, CATALOG.replace("name: tiny", "name: a2") + "  - name: b2\n    hf: org/tiny\n")
    cli("lock", "-c", cat)
    models = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]
    assert {n: e["commit"] for n, e in models.items()} == {"a2": newest, "b2": newest}


@pytest.mark.parametrize("path", ["model.safetensors", "config.json"])  # an LFS file, a small one
def test_a_lock_entry_that_is_not_its_commits_says_so(cli: Cli, fake_hub: FakeHub, tmp_path: Path, path: str) -> None:
    """A merge resolved by hand (the commit from one side, a file's sha256 from the other) read as
    "sha256 mismatch after two downloads", as if the Hub served damaged bytes."""
    commit = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    lock = tmp_path / "catalog.lock"
    lock.write_text(lock.read_text().replace(_sha(FILES[path]), _sha(b"the other side")))
    result = cli("build", "-c", cat, code=1)
    assert (
        f"org/tiny@{commit[:12]}: {path}: the lock has sha256 {_sha(b'the other side')}, but the Hub lists this "
        f"commit's file as {_sha(FILES[path])} and serves that: the lock's entry is not this commit's"
    ) in result.stderr
    # what it says to do mends it: the entry dropped and made anew
    assert f"drop the model's entry from it and run `modelcar lock -c {cat}`" in result.stderr
    doc = yaml.safe_load(lock.read_text())
    del doc["models"]["tiny"]
    lock.write_text(yaml.safe_dump(doc))
    cli("lock", "-c", cat)
    cli("build", "-c", cat)


def test_a_pinned_commit_the_hub_lost_says_how_to_move_on(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A repo whose history was squashed has no commit the lock pins: "check `revision:`" was wrong."""
    old = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    fake_hub.add_repo("org/tiny", {**FILES, "extra.json": b"{}"})
    del fake_hub.repos["org/tiny"][old]  # super_squash_history
    write_catalog(cat, CATALOG.replace('["*.json", "*.safetensors"]', '["*.json"]'))
    result = cli("lock", "-c", cat, code=2)
    assert result.stderr == (
        f"error: {cat}: models[0] (tiny): the pinned commit {old} is not on the Hub any more (its history "
        f"rewritten?): `modelcar lock --update tiny -c {cat}` pins what `revision: main` names now\n"
    )
    write_catalog(cat, CATALOG)  # and a build of the pin as it is
    result = cli("build", "-c", cat, code=2)
    assert (
        f"commit {old} is not on the Hub any more (its history rewritten?): `modelcar lock --update -c {cat}`"
        in result.stderr
    )
    cli("lock", "-c", cat, "--update")


def test_lock_follows_tree_pagination(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    many = {f"shard-{i:03d}.json": f'{{"i": {i}}}'.encode() for i in range(25)}
    fake_hub.add_repo("org/many", many)
    fake_hub.page_size = 7
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: many\n    hf: org/many\n")
    cli("lock", "-c", cat)
    files = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["many"]["files"]
    assert [f["path"] for f in files] == sorted(many)


def test_corrupt_small_file_fails_git_blob_check(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.inject("file", "corrupt", path="config.json", times=1, methods=("GET",))
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    result = cli("lock", "-c", cat, code=1)
    assert "config.json: git blob id mismatch" in result.stderr
    assert not (tmp_path / "catalog.lock").exists()
    assert not list((tmp_path / "hf-cache").rglob(git_oid(FILES["config.json"])))  # no blob named for bad bytes
    cli("lock", "-c", cat)  # a re-run succeeds


def test_a_listing_past_any_model_s_size_is_refused(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub (a mirror's HF_ENDPOINT) that pages its listing without end: `lock` held every entry
    until it ran out of memory. Past TREE_MAX entries the listing is refused."""
    from modelcar import hub

    fake_hub.page_size = 2
    files = {f"f{i}.json": b"{}" for i in range(5)}
    fake_hub.add_repo("org/many", files)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: many\n    hf: org/many\n")
    monkeypatch.setattr(hub, "TREE_MAX", len(files))
    cli("lock", "-c", cat)
    monkeypatch.setattr(hub, "TREE_MAX", len(files) - 1)
    cat.with_suffix(".lock").unlink()
    error = json.loads(cli("lock", "-c", cat, "--json", code=1).stdout)["error"]
    assert "org/many@" in error and f"the Hub lists more than {len(files) - 1} entries: not a model" in error
    # and its pages: a Hub that answers page after empty page, each naming a next one, never ended
    monkeypatch.setattr(hub, "TREE_MAX", len(files))
    monkeypatch.setattr(hub, "TREE_PAGES", 2)  # the listing takes 3
    error = json.loads(cli("lock", "-c", cat, "--json", code=1).stdout)["error"]
    assert "more than 2 pages of a listing: not a model's" in error, error


def test_a_listing_s_next_page_on_another_host_is_not_asked_with_the_token(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page of a listing names the next in its Link header; the token went along to whatever
    host that named (a hostile HF_ENDPOINT or a proxy rewriting the header)."""
    fake_hub.page_size = 2
    fake_hub.add_repo("org/many", {f"f{i}.json": b"{}" for i in range(5)})
    port = fake_hub.url.rsplit(":", 1)[1]
    fake_hub.next_page_base = f"http://127.0.0.2:{port}"
    monkeypatch.setenv("HF_TOKEN", "hf_" + "s3cret" * 6)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: many\n    hf: org/many\n")
    result = cli("lock", "-c", cat, code=1)
    assert "the next page of the answer is on another host: not followed" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert fake_hub.count("GET", "/tree/" + fake_hub.repos["org/many"]["main"].sha) == 1  # the first page only
    fake_hub.next_page_base = None
    cli("lock", "-c", cat)


def test_repo_and_revision_not_found(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: gone\n    hf: org/gone\n")
    result = cli("lock", "-c", cat, code=2)
    assert f"{cat}: models[0] (gone): org/gone@main: repository not found" in result.stderr
    assert "HF_TOKEN" in result.stderr
    write_catalog(cat, "models:\n  - name: tiny\n    hf: org/tiny\n    revision: v9\n")
    result = cli("lock", "-c", cat, code=2)
    assert "org/tiny@v9: revision not found" in result.stderr


def test_a_model_taken_out_of_the_catalog_loses_its_pin_and_says_so(cli: Cli, tmp_path: Path) -> None:
    """The lock follows the catalog; a pin dropped without a word looked like a lost entry."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"n": "{name}"}}')
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    path: ./a\n  - name: b\n    path: ./b\n")
    cli("lock", "-c", cat)
    write_catalog(cat, "models:\n  - name: a\n    path: ./a\n")
    result = cli("lock", "-c", cat)
    assert "catalog.lock: b no longer in catalog.yaml: its pin dropped" in result.stderr
    assert list(yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]) == ["a"]
    assert "dropped" not in cli("lock", "-c", cat).stderr


def test_path_source_is_hashed_and_relative(cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "models" / "ft"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "model.safetensors").write_bytes(WEIGHTS)
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: main")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: ft\n    path: ./models/ft\n")
    cli("lock", "-c", cat)
    entry = yaml.safe_load((tmp_path / "catalog.lock").read_text())["models"]["ft"]
    assert entry["source"] == "path://models/ft"
    assert "revision" not in entry
    assert len(entry["commit"]) == 40
    assert entry["files"] == [
        {"path": "config.json", "size": 2, "sha256": _sha(b"{}")},
        {"path": "sub/model.safetensors", "size": len(WEIGHTS), "sha256": _sha(WEIGHTS)},
    ]


def _local_model_locked(cli: Cli, tmp_path: Path, command: str) -> tuple[Path, Path]:
    """A catalog with one local model `ft`, run through `command` (lock or build): (catalog, lock)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: ft\n    path: ./m\n")
    cli(command, "-c", cat)
    return cat, tmp_path / "catalog.lock"


def test_a_broken_lock_is_one_line_naming_where(cli: Cli, tmp_path: Path) -> None:
    cat, lock = _local_model_locked(cli, tmp_path, "lock")
    good = lock.read_text()
    lines = good.splitlines(keepends=True)
    lock.write_text("".join([*lines[:3], "<<<<<<< HEAD\n", *lines[3:], "=======\n", ">>>>>>> branch\n"]))
    result = cli("lock", "-c", cat, code=2)
    assert result.stderr.strip() == (
        f"error: {lock}: git merge conflict markers: take either side (`git checkout --ours catalog.lock` or "
        f"--theirs), then run `modelcar lock -c {cat}` to fold the merged catalog in again"
    )
    lock.write_text(good.replace("models:\n", "models:\n  ft: [\n", 1))
    result = cli("lock", "-c", cat, code=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {lock}:") and ": YAML syntax error: " in result.stderr


def test_a_hand_edited_digest_or_commit_in_the_lock_is_refused(cli: Cli, tmp_path: Path) -> None:
    """A stray keystroke in a merge: patch pinned `@sha256:<65 hex>` in the overlays, verify ended
    in a traceback, and a shortened commit built and tagged another image."""
    cat, lock = _local_model_locked(cli, tmp_path, "build")
    good = lock.read_text()
    digest = yaml.safe_load(good)["models"]["ft"]["image"]["digest"]
    commit = yaml.safe_load(good)["models"]["ft"]["commit"]
    for bad, where, what in (
        (good.replace(digest, digest + "0"), "models.ft.image.digest", "sha256: and 64 lowercase hex characters"),
        (good.replace(commit, commit[:8]), "models.ft.commit", "a full commit: 40 lowercase hex characters"),
    ):
        lock.write_text(bad)
        for command in ("lock", "build", "patch", "verify", "plan"):
            result = cli(command, "-c", cat, code=2)
            assert result.stderr == (
                f"error: {lock}: {where}: must be {what}; fix it, or take it back from git "
                "(`git checkout -- catalog.lock`): deleting it re-pins every model\n"
            ), command


def test_a_lock_from_a_newer_modelcar_is_kept_and_said_so(cli: Cli, tmp_path: Path) -> None:
    """A rollback, or CI jobs on two versions: the advice was to delete the lock, which re-pins
    every model to its branch's head and drops every digest."""
    cat, lock = _local_model_locked(cli, tmp_path, "build")
    data = yaml.safe_load(lock.read_text())
    data["models"]["ft"]["image"]["signed_by"] = "a field of a later release"
    lock.write_text(yaml.safe_dump(data))
    result = cli("build", "-c", cat, code=2)
    assert result.stderr == (
        f"error: {lock}: models.ft.image.signed_by: a field this modelcar does not know: a typo (fix it), or "
        "a lock written by a newer modelcar (use that version or a later one; the lock holds the pins: keep it)\n"
    )
    data["version"] = 2
    lock.write_text(yaml.safe_dump(data))
    result = cli("lock", "-c", cat, code=2)
    assert result.stderr == (
        f"error: {lock}: lock version 2 is newer than this modelcar reads (1): upgrade modelcar (the lock "
        "holds the pins: keep it)\n"
    )
    assert yaml.safe_load(lock.read_text()) == data  # left as it was


@pytest.mark.parametrize("field", ["commit", "image.digest", "files.0.sha256"])
def test_a_value_with_a_trailing_newline_in_the_lock_is_refused(cli: Cli, tmp_path: Path, field: str) -> None:
    """`$` matches before a final newline: a quoted "...\\n" passed every pattern of the lock."""
    cat, lock = _local_model_locked(cli, tmp_path, "build")
    data = yaml.safe_load(lock.read_text())
    *parents, key = field.split(".")
    node = data["models"]["ft"]
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] += "\n"
    lock.write_text(yaml.safe_dump(data))
    result = cli("lock", "-c", cat, code=2)
    assert f"error: {lock}: models.ft.{field}: must be" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("field", "bad", "said"),
    [
        ("path", "../../../../.bashrc", "must be a relative path inside the model"),
        ("path", "/etc/cron.d/x", "must be a relative path inside the model"),
        ("revision", "../../../../hooks/pre-commit", "is not a valid revision"),
    ],
)
def test_a_lock_naming_a_file_outside_is_refused(cli: Cli, tmp_path: Path, field: str, bad: str, said: str) -> None:
    """A pull request editing only the lock: its file paths and revision name files in the HF cache
    (`mirror --to hf-cache:` linked a snapshot file and wrote refs/<revision> wherever they said)."""
    cat, lock = _local_model_locked(cli, tmp_path, "lock")
    data = yaml.safe_load(lock.read_text())
    entry = data["models"]["ft"]
    if field == "path":
        entry["files"][0]["path"] = bad
    else:
        entry["source"], entry["revision"] = "hf://org/ft", bad
    lock.write_text(yaml.safe_dump(data))
    for command in ("lock", "mirror"):
        args = ["--to", f"hf-cache:{tmp_path / 'cache'}"] if command == "mirror" else []
        result = cli(command, "-c", cat, *args, code=2)
        assert f"error: {lock}: models.ft." in result.stderr and said in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_hub_listing_a_file_outside_its_repo_is_refused(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("org/tiny", {**FILES, "../../escape.safetensors": WEIGHTS})
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    result = cli("lock", "-c", cat, code=1)
    assert "the Hub lists a file at '../../escape.safetensors', outside the repo: not taken" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "catalog.lock").exists()


def test_files_named_as_layer_whiteouts_are_refused_until_excluded(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """`.wh.NAME` in a layer deletes NAME when a runtime unpacks it, and `.wh..wh..opq` its
    directory's other files: containerd and podman dropped them, while verify said the image was
    whole. Hub repos and local directories alike; `exclude` leaves them out."""
    fake_hub.add_repo("org/tiny", {**FILES, "sub/.wh..wh..opq.json": b"{}", "tok.wh.json": b"{}"})
    fake_hub.add_repo("org/other", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG + "  - name: other\n    hf: org/other\n")
    result = cli("lock", "-c", cat, code=2)
    assert f"error: {cat}: models[0] (tiny): org/tiny@" in result.stderr and result.stderr.rstrip().endswith(
        "sub/.wh..wh..opq.json: a name starting with '.wh.' is a whiteout in image layers (runtimes delete it): "
        'leave it out with `exclude: [".wh.*", "*/.wh.*"]`'
    )
    assert not (tmp_path / "catalog.lock").exists()
    excluding = CATALOG.replace('exclude: ["original/**"]', 'exclude: ["original/**", ".wh.*", "*/.wh.*"]')
    write_catalog(cat, excluding + "  - name: other\n    hf: org/other\n")
    cli("lock", "-c", cat)
    lock = yaml.safe_load((tmp_path / "catalog.lock").read_text())
    assert [f["path"] for f in lock["models"]["tiny"]["files"] if "wh" in f["path"]] == ["tok.wh.json"]

    # A lock from before whiteouts were refused: the model is locked again (and refused until
    # excluded); the lock's other models are not held up by it.
    write_catalog(cat, CATALOG + "  - name: other\n    hf: org/other\n")
    lock["models"]["tiny"]["exclude"] = ["original/**"]
    lock["models"]["tiny"]["files"].append({"path": "sub/.wh..wh..opq.json", "sha256": _sha(b"{}"), "size": 2})
    (tmp_path / "catalog.lock").write_text(yaml.safe_dump(lock))
    cli("lock", "-c", cat, "other")
    assert "a name starting with '.wh.'" in cli("build", "-c", cat, "tiny", code=2).stderr

    model = tmp_path / "m"
    model.mkdir()
    (model / ".wh.config.json").write_text("{}")
    local = write_catalog(tmp_path / "local.yaml", "models:\n  - name: ft\n    path: ./m\n")
    result = cli("build", "-c", local, code=2)
    assert f"error: {local}: models[0] (ft): {model / '.wh.config.json'}: a name starting with '.wh.'" in result.stderr
    assert not (tmp_path / "local.lock").exists()


def test_the_lock_has_the_same_bytes_with_or_without_libyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is read and written with libyaml when PyYAML has it, and by PyYAML alone when not:
    the two must agree byte for byte, or a lock would change from one machine to the next."""
    from modelcar import lock as lockmod
    from modelcar.lock import Lock, LockedFile, LockedImage, LockedModel, dump_lock, read_lock

    assert yaml.__with_libyaml__ and lockmod.YAML_DUMPER is yaml.CSafeDumper  # the wheel ships libyaml
    awkward = ["yes", "null", "0123", "1e3", "*.safetensors", "a: b", "#x", " lead", "~", "café/模型.json", "x" * 300]
    files = [
        LockedFile(path=p, size=i * 1_000_000_007, sha256=hashlib.sha256(p.encode()).hexdigest())
        for i, p in enumerate(awkward)
    ]
    lock = Lock(
        models={
            "zeta": LockedModel(source="hf://org/zeta", revision="v1.0", commit="a" * 40, include=awkward, files=files),
            "alpha": LockedModel(
                source="path:./models/alpha",
                commit="b" * 40,
                exclude=["*.bin"],
                files=files[:2],
                image=LockedImage(digest="sha256:" + "c" * 64, repository="ghcr.io/acme/modelcars/alpha"),
            ),
        }
    )
    fast = dump_lock(lock)
    (tmp_path / "fast.lock").write_text(fast)
    monkeypatch.setattr(lockmod, "YAML_DUMPER", yaml.SafeDumper)
    monkeypatch.setattr(lockmod, "YAML_LOADER", yaml.SafeLoader)
    assert dump_lock(lock) == fast
    pure = read_lock(tmp_path / "fast.lock")
    monkeypatch.undo()
    assert read_lock(tmp_path / "fast.lock") == pure
    assert dump_lock(pure) == fast


def test_recorded_image_keeps_what_a_push_recorded_only_for_the_same_image() -> None:
    from modelcar.catalog import ModelSpec
    from modelcar.lock import LockedImage, image_answers, recorded_image

    spec = ModelSpec.model_validate({"name": "m", "path": "./m", "tags": ["stable", "v2"]})
    pushed = recorded_image(None, "sha256:" + "a" * 64, "reg.example/models/m", spec, built=True)
    assert (pushed.base, pushed.tags) == ("scratch", ["stable", "v2"])
    old = LockedImage(digest="sha256:" + "a" * 64, repository="reg.example/models/m", base="scratch", tags=["stable"])
    local = recorded_image(old, old.digest or "", None, spec, built=True)  # built into the layout only
    assert (local.repository, local.tags) == (old.repository, ["stable"])  # v2 was not pushed: not claimed
    assert not image_answers(local, spec)
    other = recorded_image(old, "sha256:" + "b" * 64, None, spec, built=True)
    assert (other.repository, other.tags) == (None, None)
    # `modelcar push` copies the pinned image: its base is what was recorded, not the catalog's now
    based = ModelSpec.model_validate({"name": "m", "path": "./m", "base": "reg.example/sh@sha256:" + "e" * 64})
    copied = recorded_image(old, old.digest or "", "reg.example/models/m", based, built=False)
    assert copied.base == "scratch" and not image_answers(copied, based)
    unknown = LockedImage(digest=old.digest, repository=old.repository)  # a lock from before bases were recorded
    assert recorded_image(unknown, old.digest or "", "reg.example/models/m", based, built=False).base is None


def test_a_lock_update_beside_a_build_keeps_the_image_the_build_recorded(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lock --update` read the lock, a build recorded its image, then the update (same commit)
    wrote the entry it had read: the image was gone, and `patch` refused the model."""
    from modelcar import api, resolve

    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    api.lock(cat)
    real = resolve.lock_one
    built: list[str] = []

    def build_first(*args: object, **kwargs: object) -> object:
        if not built:  # the update has read the lock: a build lands now
            built.append(api.build(cat)[0].digest or "")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(resolve, "lock_one", build_first)
    api.lock(cat, update=True)
    assert built and _lock(tmp_path / "catalog.lock")["models"]["tiny"]["image"]["digest"] == built[0]


def test_a_build_whose_pin_moved_meanwhile_records_no_image(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `lock --update` pinned a new commit while a build made the old one's image: the build's
    write put the old pin back. Now the new pin stays, and the build says its image is not
    recorded (exit 1)."""
    from modelcar import api, build

    old = fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    real = build.write_image

    def repinned_meanwhile(*args: object, **kwargs: object) -> str:
        new = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen3"}\n'})
        api.lock(cat, update=True)
        assert _lock(tmp_path / "catalog.lock")["models"]["tiny"]["commit"] == new
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(build, "write_image", repinned_meanwhile)
    result = cli("build", "-c", cat, "--json", code=1)
    entry = _lock(tmp_path / "catalog.lock")["models"]["tiny"]
    assert entry["commit"] != old and "image" not in entry
    (model,) = json.loads(result.stdout)["models"]
    assert model["commit"] == old and model["digest"]  # built, and said so
    said = f"tiny: the lock pins commit {entry['commit'][:12]} now"
    assert said in result.stderr and f"image of commit {old[:12]}" in result.stderr and "not recorded" in result.stderr


def test_a_recorded_image_keeps_what_another_run_recorded_of_it(tmp_path: Path) -> None:
    """A layout build and a push of the same image at once: the layout build's entry, read before
    the push recorded where it went, dropped the repository and tags (patch then refused it as
    unpushed). The image is recorded into the entry as it is when the lock is written."""
    from modelcar.catalog import load_catalog
    from modelcar.lock import LockedFile, LockedImage, LockedModel, Recorded, read_lock, save_entries

    cat = load_catalog(write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    hf: o/m\n    tags: [v1]\n"))
    (spec,) = cat.models
    files = [LockedFile(path="config.json", size=2, sha256="d" * 64)]
    read = LockedModel(source="hf://o/m", revision="main", commit="c" * 40, files=files)
    digest = "sha256:" + "e" * 64
    pushed = LockedImage(digest=digest, repository="r.example/m/m", base="scratch", tags=["v1"])
    save_entries(cat, {"m": read.model_copy(update={"image": pushed})})  # the push, landed first
    save_entries(cat, {"m": Recorded(spec, read, digest, None, built=True)})  # the layout build
    image = read_lock(cat.lock_file).models["m"].image
    assert image is not None and (image.digest, image.repository, image.tags) == (digest, "r.example/m/m", ["v1"])


def test_lock_update_lists_only_the_trees_of_models_that_moved(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """A commit's files never change: where the revision still names the pinned commit, the entry
    keeps its files; only a model that moved has its tree listed (and small files hashed) again."""
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.add_repo("org/other", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG + "  - name: other\n    hf: org/other\n")
    cli("lock", "-c", cat)
    before = _lock(tmp_path / "catalog.lock")["models"]
    moved = fake_hub.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "qwen3"}\n'})
    fake_hub.requests.clear()
    cli("lock", "--update", "-c", cat)
    after = _lock(tmp_path / "catalog.lock")["models"]
    trees = [p for m, p in fake_hub.requests if "/tree/" in p]
    assert len(trees) == 1 and "/org/tiny/tree/" in trees[0], trees
    assert after["other"] == before["other"] and after["tiny"]["commit"] == moved
    assert after["tiny"]["files"] != before["tiny"]["files"]


def test_lock_names_every_model_it_cannot_pin(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """All entries are asked at once; the first failure alone was said, so CI fixed and ran again
    once per broken model. The lock stays as it was."""
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(
        tmp_path / "catalog.yaml",
        CATALOG + "  - name: gone\n    hf: org/gone\n  - name: typo\n    hf: org/tiny\n    revision: mian\n",
    )
    result = cli("lock", "-c", cat, "--json", code=2)
    error = json.loads(result.stdout)["error"]
    assert "models[1] (gone): " in error and "models[2] (typo): " in error and "revision not found" in error
    assert not (tmp_path / "catalog.lock").exists()


def test_a_lock_text_is_parsed_once_and_not_written_out_again_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build reads its lock four times and writes it twice; a model of 3,000 files makes that
    a 400 KB YAML, 60 ms a parse and 45 ms a dump: a no-op rebuild spent a third of its time there."""
    from modelcar import lock as lock_module
    from modelcar.lock import LockedFile, LockedModel, read_lock, write_lock

    path = tmp_path / "catalog.lock"
    files = [LockedFile(path=f"f{i}.json", size=i + 1, sha256=f"{i:064x}") for i in range(50)]
    entry = LockedModel(source="hf://o/m", revision="main", commit="c" * 40, files=files)
    assert write_lock(path, lock_module.Lock(models={"m": entry}))
    loads, dumps = [], []
    real_load, real_dump = lock_module.yaml.load, lock_module.yaml.dump
    monkeypatch.setattr(lock_module.yaml, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(lock_module.yaml, "dump", lambda *a, **k: dumps.append(1) or real_dump(*a, **k))

    first = read_lock(path)
    assert read_lock(path) == first and read_lock(path) is not first  # entries made afresh each time
    assert not write_lock(path, read_lock(path))
    assert (loads, dumps) == ([], [])  # the text this process wrote: known, and known to be canonical
    # another writer's text: parsed once, then known
    text = path.read_text().replace("c" * 40, "d" * 40)
    path.write_text(text)
    assert read_lock(path).models["m"].commit == "d" * 40 and read_lock(path).models["m"].commit == "d" * 40
    assert len(loads) == 1
    changed = read_lock(path)
    changed.models["m"].files = changed.models["m"].files[:-1]
    assert write_lock(path, changed) and read_lock(path) == changed
    # the bytes count, not the text: a lock saved with CRLF line ends is written out again
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert write_lock(path, read_lock(path)) and b"\r\n" not in path.read_bytes()


def test_a_push_that_ends_after_a_rebuild_records_not_the_older_image(tmp_path: Path) -> None:
    """`push` copies the image the lock names when it begins; a build of the same pin that lands
    meanwhile names another: recording the push would take the lock back to the older image."""
    from modelcar.catalog import load_catalog
    from modelcar.lock import LockedFile, LockedImage, LockedModel, NotRecorded, Recorded, read_lock, save_entries

    cat = load_catalog(write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    hf: o/m\n"))
    (spec,) = cat.models
    files = [LockedFile(path="config.json", size=2, sha256="d" * 64)]
    old, new = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    read = LockedModel(source="hf://o/m", revision="main", commit="c" * 40, files=files, image=LockedImage(digest=old))
    save_entries(cat, {"m": read})
    save_entries(cat, {"m": Recorded(spec, read, new, None, built=True)})  # the rebuild lands
    with pytest.raises(NotRecorded, match=f"names image {new} now"):
        save_entries(cat, {"m": Recorded(spec, read, old, "r.example/p/m", built=False)})  # then the push
    image = read_lock(cat.lock_file).models["m"].image
    assert image is not None and image.digest == new and image.repository is None


def test_failures_of_several_models_are_one_error_of_their_kind() -> None:
    from modelcar.errors import CatalogError, InputError, ModelcarError, NotLocked, PartialFailure, all_of
    from modelcar.hub import HubError

    hub = all_of([HubError("a: gone"), HubError("b: gone")])
    assert type(hub) is HubError and str(hub) == "a: gone\nb: gone" and hub.exit_code == 1
    both_input = all_of([CatalogError("a"), NotLocked("b")])
    assert type(both_input) is InputError and both_input.exit_code == 2
    assert type(all_of([CatalogError("a"), HubError("b")])) is ModelcarError
    made_otherwise = all_of([PartialFailure("a", []), PartialFailure("b", [])])  # its kind needs results
    assert type(made_otherwise) is ModelcarError and str(made_otherwise) == "a\nb"


def test_a_push_recorded_after_the_image_was_dropped_says_so(tmp_path: Path) -> None:
    from modelcar.catalog import load_catalog
    from modelcar.lock import LockedFile, LockedImage, LockedModel, NotRecorded, Recorded, save_entries

    cat = load_catalog(write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    hf: o/m\n"))
    (spec,) = cat.models
    files = [LockedFile(path="config.json", size=2, sha256="d" * 64)]
    digest = "sha256:" + "1" * 64
    read = LockedModel(source="hf://o/m", commit="c" * 40, files=files, image=LockedImage(digest=digest))
    save_entries(cat, {"m": read.model_copy(update={"image": None})})  # `lock` dropped it meanwhile
    with pytest.raises(NotRecorded, match="the lock names no image now") as info:
        save_entries(cat, {"m": Recorded(spec, read, digest, "r.example/p/m", built=False)})
    assert list(info.value.refused) == ["m"]


def test_a_new_commit_hashes_only_the_small_files_it_changed(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file the cache holds as the earlier commit's, of the same git blob id, keeps the
    earlier entry's sha256: a new commit of a repo of 3,000 small files read and hashed them all."""
    from modelcar import hub

    files = {**FILES, "sub/dir/extra.json": b'{"nested": true}\n'}
    fake_hub.add_repo("org/tiny", files)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    before = {f["path"]: f["sha256"] for f in _lock(tmp_path / "catalog.lock")["models"]["tiny"]["files"]}
    changed = b'{"model_type": "qwen3"}\n'
    commit = fake_hub.add_repo("org/tiny", {**files, "config.json": changed})
    hashed: list[int] = []
    real = hub.git_blob_id
    monkeypatch.setattr(hub, "git_blob_id", lambda size, chunks: hashed.append(size) or real(size, chunks))
    cli("lock", "--update", "-c", cat)
    after = {f["path"]: f["sha256"] for f in _lock(tmp_path / "catalog.lock")["models"]["tiny"]["files"]}
    assert hashed == [len(changed)]  # config.json only
    assert after == {**before, "config.json": _sha(changed)} and "sub/dir/extra.json" in after
    # linked as huggingface_hub links them: relative, to the blob
    link = tmp_path / "hf-cache" / "models--org--tiny" / "snapshots" / commit / "sub" / "dir" / "extra.json"
    assert (
        os.readlink(link) == os.path.relpath(link.resolve(), link.parent) and link.read_bytes() == b'{"nested": true}\n'
    )
    cli("build", "-c", cat)  # and the files are where the build reads them, as the lock says


def test_a_small_file_costs_the_hub_one_request_and_lands_where_huggingface_hub_finds_it(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """hf_hub_download asks a HEAD before each GET: two Hub requests a small file (6,000 for a repo
    of 3,000 tokenizer files). One GET now, into the HF cache as huggingface_hub lays it out: it
    reads the files offline, and the build asks the Hub for none of them again."""
    small = {f"tok/{n:03d}.json": f'{{"n": {n}}}\n'.encode() for n in range(20)}
    commit = fake_hub.add_repo("org/tiny", {**FILES, **small})
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    fake_hub.requests.clear()
    cli("lock", "-c", cat)
    resolved = [(m, p) for m, p in fake_hub.requests if "/resolve/" in p]
    locked = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]["tiny"]["files"]
    smalls = [f["path"] for f in locked if f["size"] < 1024]  # the fake Hub's LFS threshold
    assert len(smalls) >= 21 and sorted(p.split("/resolve/")[1].split("/", 1)[1] for _, p in resolved) == sorted(smalls)
    assert {m for m, _ in resolved} == {"GET"}
    from huggingface_hub import hf_hub_download

    for path in smalls:
        got = hf_hub_download("org/tiny", path, revision=commit, cache_dir=tmp_path / "hf-cache", local_files_only=True)
        assert Path(got).read_bytes() == {**FILES, **small}[path]
    fake_hub.requests.clear()
    cli("build", "-c", cat)
    assert not [p for _, p in fake_hub.requests if any(p.endswith("/" + s) for s in smalls)]


def test_a_build_whose_lock_was_made_elsewhere_fetches_each_small_file_with_one_request(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI worker builds from the lock in the repository, with an empty HF cache: its small files
    came with hf_hub_download's HEAD and GET each. One listing of the commit and one GET each now."""
    small = {f"tok/{n:03d}.json": f'{{"n": {n}}}\n'.encode() for n in range(10)}
    commit = fake_hub.add_repo("org/tiny", {**FILES, **small})
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "worker-cache"))
    fake_hub.requests.clear()
    cli("build", "-c", cat, "--layout", tmp_path / "worker-layout")
    locked = yaml.safe_load(cat.with_suffix(".lock").read_text())["models"]["tiny"]["files"]
    smalls = {f["path"] for f in locked if f["size"] < 1024}
    asked = [(m, p.split("?")[0]) for m, p in fake_hub.requests]
    for_smalls = [(m, p) for m, p in asked if "/resolve/" in p and p.split(f"/{commit}/", 1)[1] in smalls]
    assert sorted(for_smalls) == sorted(("GET", f"/org/tiny/resolve/{commit}/{p}") for p in smalls)
    assert [p for _, p in asked if "/tree/" in p] == [f"/api/models/org/tiny/tree/{commit}"]
    cli("verify", "-c", cat, "--from", f"oci:{tmp_path / 'worker-layout'}")
