"""Catalog errors: each names the file, the model and the field, says what is allowed, exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelcar.catalog import load_catalog
from modelcar.errors import CatalogError
from tests.conftest import Cli, write_catalog

GOOD_MODEL = "  - name: tiny\n    path: ./m\n"


def _lock_error(cli: Cli, catalog: Path) -> str:
    result = cli("lock", "-c", catalog, code=2)
    assert result.stdout == ""
    return str(result.stderr)


def test_missing_file(cli: Cli, tmp_path: Path) -> None:
    err = _lock_error(cli, tmp_path / "nope.yaml")
    assert f"{tmp_path / 'nope.yaml'}: catalog file not found" in err
    assert "-c/--catalog" in err


def test_a_directory_given_as_the_catalog_is_said_to_be_one(cli: Cli, tmp_path: Path) -> None:
    assert f"{tmp_path}: a directory, not a catalog file" in _lock_error(cli, tmp_path)


def test_a_single_value_where_a_list_goes_shows_the_list(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    hf: o/a\n    tags: stable\n")
    assert "models[0] (a): tags: expected a list, e.g. `tags: [stable]`" in _lock_error(cli, cat)


def test_every_line_of_several_problems_is_an_error_line(cli: Cli, tmp_path: Path) -> None:
    """A CI log is read with `grep error:`: a catalog's second problem had no prefix."""
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: A\n    hf: o/a\n  - name: B\n    hf: o/b\n")
    lines = _lock_error(cli, cat).splitlines()
    assert len(lines) >= 2 and all(line.startswith("error: ") for line in lines), lines


def test_yaml_syntax_error_names_line(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    hf: [unclosed\n  - name: b\n")
    err = _lock_error(cli, cat)
    assert f"{cat}:4:" in err or f"{cat}:3:" in err
    assert "YAML syntax error" in err


def test_unknown_key_lists_allowed(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n    revison: v2\n")
    err = _lock_error(cli, cat)
    assert f"{cat}: models[0] (tiny): revison: unknown key" in err
    assert "revision" in err.split("allowed keys here:")[1]


def test_unknown_top_level_and_nested_keys(tmp_path: Path) -> None:
    cat = write_catalog(
        tmp_path / "catalog.yaml",
        "registy: x\nmodels:\n  - name: tiny\n    hf: org/tiny\n"
        "    overlays:\n      - path: o\n        target: {kind: Deployment, name: d, namespace: x}\n",
    )
    with pytest.raises(Exception) as info:
        load_catalog(cat)
    msg = str(info.value)
    assert f"{cat}: registy: unknown key; allowed keys here: defaults, models, registry" in msg
    assert f"{cat}: models[0] (tiny): overlays[0].target.namespace: unknown key; allowed keys here: kind, name" in msg


def test_bad_model_name(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: Qwen_Big!\n    hf: org/x\n")
    err = _lock_error(cli, cat)
    assert f"{cat}: models[0] (Qwen_Big!): name: 'Qwen_Big!' is not a valid model name" in err
    assert "[a-z0-9]+((.|_|__|-+)[a-z0-9]+)*" in err


def test_duplicate_names(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    hf: o/a\n  - name: a\n    hf: o/b\n")
    err = _lock_error(cli, cat)
    assert f"{cat}: models[1] (a): name: duplicate; models[0] has it too" in err


def test_duplicate_yaml_key_is_an_error(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: a\n    hf: o/a\n    hf: o/b\n")
    err = _lock_error(cli, cat)
    assert f"{cat}:4:" in err and "duplicate key 'hf'" in err


@pytest.mark.parametrize(
    "body",
    ["  - name: a\n    hf: o/a\n    path: ./a\n", "  - name: a\n    revision: main\n"],
    ids=["both", "neither"],
)
def test_exactly_one_source(cli: Cli, tmp_path: Path, body: str) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + body)
    err = _lock_error(cli, cat)
    assert f"{cat}: models[0] (a): set exactly one of 'hf' (a Hub repo id) or 'path' (a local directory)" in err


@pytest.mark.parametrize("revision", ["has space", "a..b", "feature/", "-x", "v1.lock", "a:b"])
def test_bad_revision(cli: Cli, tmp_path: Path, revision: str) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", f"models:\n  - name: a\n    hf: o/a\n    revision: '{revision}'\n")
    err = _lock_error(cli, cat)
    assert f"{cat}: models[0] (a): revision: {revision!r} is not a valid revision" in err
    assert "40-hex commit" in err


def test_good_revisions_and_defaults_merge(tmp_path: Path) -> None:
    cat = write_catalog(
        tmp_path / "catalog.yaml",
        "registry: ghcr.io/acme/models\n"
        "defaults:\n  include: ['*.json']\n  revision: v1.0\n  tags: [stable]\n"
        "models:\n  - name: a\n    hf: o/a\n"
        f"  - name: b\n    hf: o/b\n    revision: {'a' * 40}\n    include: ['*.safetensors']\n"
        "  - name: c\n    path: ./c\n",
    )
    catalog = load_catalog(cat)
    a, b, c = catalog.models
    assert (a.hf_revision, a.include, a.tags) == ("v1.0", ["*.json"], ["stable"])
    assert (b.hf_revision, b.include) == ("a" * 40, ["*.safetensors"])
    assert c.revision is None and c.include == ["*.json"]  # a default branch does not apply to a path
    assert catalog.lock_file == tmp_path / "catalog.lock"


def test_bad_tag_base_and_registry(tmp_path: Path) -> None:
    cat = write_catalog(
        tmp_path / "catalog.yaml",
        "registry: GHCR.io/Acme\nmodels:\n  - name: a\n    hf: o/a\n    tags: ['bad tag']\n    base: busybox:latest\n",
    )
    with pytest.raises(Exception) as info:
        load_catalog(cat)
    msg = str(info.value)
    assert f"{cat}: registry: 'GHCR.io/Acme' is not a registry prefix" in msg
    assert f"{cat}: models[0] (a): tags: 'bad tag' is not a valid OCI tag" in msg
    assert f"{cat}: models[0] (a): base: 'busybox:latest' must be pinned by digest" in msg


def test_a_base_with_credentials_is_a_catalog_error_that_does_not_repeat_them(tmp_path: Path) -> None:
    """It was taken, and refused only by the build, as the model's failure."""
    digest = "sha256:" + "a" * 64
    cat = write_catalog(
        tmp_path / "catalog.yaml", f"models:\n  - name: a\n    hf: o/a\n    base: alice:pw@r.example/b@{digest}\n"
    )
    with pytest.raises(CatalogError) as info:
        load_catalog(cat)
    assert f"{cat}: models[0] (a): base: credentials do not go in a registry name" in str(info.value)
    assert "pw" not in str(info.value)


def test_platforms_are_linux_go_architectures_named_once_in_a_canonical_order(tmp_path: Path) -> None:
    cat = write_catalog(
        tmp_path / "catalog.yaml",
        "defaults:\n  platforms: [linux/s390x, linux/arm64/v8, linux/ppc64le]\nmodels:\n"
        "  - name: a\n    hf: o/a\n  - name: b\n    hf: o/b\n    platforms: [linux/amd64]\n",
    )
    a, b = load_catalog(cat).models
    # the index's order (none per catalog order); arm64's only variant, v8, is arm64 as containerd has it
    assert a.platforms == ["linux/arm64", "linux/ppc64le", "linux/s390x"]
    assert b.platforms == ["linux/amd64"]
    bad = {
        "[linux/x86_64]": "platforms: 'linux/x86_64': 'x86_64' is no architecture a node reports (Go's names: 386,",
        "[windows/amd64]": "platforms: 'windows/amd64' is not a platform: linux/ARCH or linux/ARCH/VARIANT",
        "[linux/arm64/8]": "platforms: 'linux/arm64/8' is not a platform",
        "[linux/amd64, linux/amd64]": "platforms: ['linux/amd64', 'linux/amd64'] names a platform twice",
        "[linux/arm64/v8, linux/arm64]": "platforms: ['linux/arm64/v8', 'linux/arm64'] names a platform twice",
        "[]": "platforms: name at least one platform, or leave the key out for the default",
    }
    for value, message in bad.items():
        write_catalog(cat, f"models:\n  - name: a\n    hf: o/a\n    platforms: {value}\n")
        with pytest.raises(CatalogError) as info:
            load_catalog(cat)
        assert f"{cat}: models[0] (a): {message}" in str(info.value), value


@pytest.mark.parametrize(
    ("field", "yaml_text"),
    [
        ("name", 'name: "m\\n"\n    hf: o/a'),
        ("hf", 'name: m\n    hf: "o/a\\n"'),
        ("tags", 'name: m\n    hf: o/a\n    tags: ["v1\\n"]'),
        ("revision", f'name: m\n    hf: o/a\n    revision: "{"a" * 40}\\n"'),
        ("base", f'name: m\n    hf: o/a\n    base: "r.example/b@sha256:{"e" * 64}\\n"'),
        ("platforms", 'name: m\n    hf: o/a\n    platforms: ["linux/amd64\\n"]'),
        ("target", 'name: m\n    hf: o/a\n    overlays: [{path: o, target: {kind: Deployment, name: "d\\n"}}]'),
        (
            "container",
            'name: m\n    hf: o/a\n    overlays: [{path: o, target: {kind: Deployment, name: d}, container: "v\\n"}]',
        ),
    ],
)
def test_a_trailing_newline_is_no_part_of_a_valid_name(tmp_path: Path, field: str, yaml_text: str) -> None:
    """`$` in a pattern matches before a final newline: `name: "m\\n"` passed, and the lock got
    the key 'm\\n'. Every name is matched whole."""
    cat = write_catalog(tmp_path / "catalog.yaml", f"models:\n  - {yaml_text}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(cat)
    assert f"{cat}: models[0]" in str(info.value) and field in str(info.value)


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("    overlays: [{path: o, target: {kind: Deployment, name: d}, container: " + "c" * 64 + "}]", "container"),
        ("    tags: [" + "t" * 129 + "]", "is not a valid OCI tag"),
        ('    include: ["/config.json"]', "is not a valid pattern: use globs relative to the repo root"),
    ],
    ids=["container-64", "tag-129", "absolute-pattern"],
)
def test_names_a_cluster_or_registry_would_refuse_are_refused_here(tmp_path: Path, model: str, said: str) -> None:
    """A container name over 63 characters, a tag over 128, would fail only at the API server or
    the registry, after the build; a pattern from / matches nothing, with a vaguer message later."""
    cat = write_catalog(tmp_path / "catalog.yaml", f"models:\n  - name: a\n    hf: o/a\n{model}\n")
    with pytest.raises(CatalogError, match=said):
        load_catalog(cat)


def test_empty_include_result(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"x")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + GOOD_MODEL + "    include: ['*.safetensors']\n")
    err = _lock_error(cli, cat)
    assert f"{cat}: models[0] (tiny): include: no file of {tmp_path / 'm'} matches include ['*.safetensors']" in err
    assert not (tmp_path / "catalog.lock").exists()


def test_empty_include_result_on_the_hub(cli: Cli, tmp_path: Path, fake_hub) -> None:  # type: ignore[no-untyped-def]
    fake_hub.add_repo("org/tiny", {"config.json": b"{}", "model.bin": b"x" * 2000})
    cat = write_catalog(
        tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n    include: ['*.safetensors']\n"
    )
    err = _lock_error(cli, cat)
    assert f"{cat}: models[0] (tiny): include: no file of org/tiny@" in err


def test_unknown_model_on_command_line(cli: Cli, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + GOOD_MODEL)
    err = _lock_error(cli, cat)  # the path does not exist: also exit 2, naming the field
    assert f"{cat}: models[0] (tiny): path: {tmp_path / 'm'} is not a directory" in err
    result = cli("lock", "nosuch", "-c", cat, code=2)
    assert "no model named 'nosuch'; the catalog has: tiny" in result.stderr


@pytest.mark.parametrize("registry", ["robot:s3cret@ghcr.io/acme", "https://robot:s3cret@ghcr.io/acme"])
def test_credentials_in_the_registry_name_are_refused_and_not_repeated(tmp_path: Path, registry: str) -> None:
    text = f"registry: {registry}\nmodels:\n  - name: a\n    hf: o/a\n"
    cat = write_catalog(tmp_path / "catalog.yaml", text)
    with pytest.raises(CatalogError) as info:
        load_catalog(cat)
    assert f"{cat}: registry: credentials do not go in a registry name" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        (
            "name",
            "raw-vllm\nimages:\n- name: vllm/vllm-openai\n  newName: evil.example/backdoor\n#",
            "Kubernetes object",
        ),
        ("name", "x/networkpolicy", "Kubernetes object name"),
        ("kind", "Deployment\npatches: []", "Kubernetes kind"),
        ("container", "vllm\n#", "container name"),
    ],
)
def test_overlay_names_are_kubernetes_names(tmp_path: Path, field: str, value: str, said: str) -> None:
    """Target names went into kustomization.yaml as text and into patch file names: a catalog edit
    could add an `images:` transformer (another server image) or overwrite the overlay's
    networkpolicy.yaml."""
    target = {"kind": "Deployment", "name": "raw-vllm"}
    container = "vllm"
    if field == "container":
        container = value
    else:
        target[field] = value
    text = (
        "models:\n  - name: a\n    hf: o/a\n    overlays:\n      - path: serving/x\n"
        f"        target: {json.dumps(target)}\n        container: {json.dumps(container)}\n"
    )
    cat = write_catalog(tmp_path / "catalog.yaml", text)
    with pytest.raises(CatalogError) as info:
        load_catalog(cat)
    assert f"{cat}: models[0] (a): overlays" in str(info.value) and said in str(info.value)
