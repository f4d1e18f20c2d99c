"""The image format (DESIGN.md section 5) on a fixed synthetic model, guarded by a golden digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from modelcar.build import FileSource, LayerResult, write_image
from modelcar.image import (
    ANN_CONTENT,
    ANN_FILE_PATH,
    ANN_FILE_SHA256,
    ANN_REVISION,
    ANN_SOURCE,
    ANN_TITLE,
    LARGE_FILE,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_MANIFEST,
    plan_layers,
)
from modelcar.lock import LockedFile, LockedModel
from modelcar.stores.layout import LayoutStore
from modelcar.tarlayer import Member, TarParams

# Changing this digest means every image modelcar builds changes: only with a format change, on purpose.
GOLDEN_INDEX_DIGEST = "sha256:6487ebd4e25e91abd265c335905cb8a91acbac24eae7a71c97e1af32333f2d95"

SYNTHETIC = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
    "tokenizer/vocab.txt": b"\n".join(b"tok%d" % i for i in range(100)),
    "model-00002-of-00002.safetensors": bytes(range(256)) * (LARGE_FILE // 256) + b"tail",
    "model-00001-of-00002.safetensors": bytes(reversed(range(256))) * (LARGE_FILE // 256 + 1),
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _entry() -> LockedModel:
    return LockedModel(
        source="hf://org/synthetic",
        revision="main",
        commit=COMMIT,
        files=[LockedFile(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in SYNTHETIC.items()],
    )


def _build(tmp: Path, params: TarParams | None = None, jobs: int = 4) -> tuple[LayoutStore, str]:
    src = tmp / "src"
    for path, data in SYNTHETIC.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    entry = _entry()
    params = params or TarParams()
    members = [Member(f.path, f.size, f.sha256) for f in entry.files]
    layers = [LayerResult(p) for p in plan_layers(members, params)]
    store = LayoutStore(tmp / "oci")
    digest = write_image(store, "synthetic", entry, layers, FileSource.fixed(lambda p: src / p), params, jobs=jobs)
    return store, digest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[LayoutStore, str]:
    return _build(tmp_path_factory.mktemp("golden"))


def _blob(store: LayoutStore, digest: str) -> dict:  # type: ignore[type-arg]
    return json.loads(store.blob_path(digest).read_bytes())


def test_golden_digest(built: tuple[LayoutStore, str]) -> None:
    assert built[1] == GOLDEN_INDEX_DIGEST


def test_same_digest_with_any_parallelism(tmp_path: Path, built: tuple[LayoutStore, str]) -> None:
    assert _build(tmp_path, jobs=1)[1] == built[1]


def test_source_date_epoch_changes_the_digest(tmp_path: Path, built: tuple[LayoutStore, str]) -> None:
    assert _build(tmp_path, TarParams(mtime=1700000000))[1] != built[1]


def test_layers_small_files_first_then_one_per_large_file(built: tuple[LayoutStore, str]) -> None:
    store, digest = built
    index = _blob(store, digest)
    manifest = _blob(store, index["manifests"][0]["digest"])
    layers = manifest["layers"]
    assert [layer["mediaType"] for layer in layers] == [MEDIA_LAYER] * 3
    assert layers[0]["annotations"][ANN_CONTENT]
    assert [layer["annotations"].get(ANN_FILE_PATH) for layer in layers[1:]] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    for layer in layers[1:]:
        path = layer["annotations"][ANN_FILE_PATH]
        assert layer["annotations"][ANN_FILE_SHA256] == hashlib.sha256(SYNTHETIC[path]).hexdigest()
        assert store.blob_path(layer["digest"]).stat().st_size == layer["size"]
        assert "sha256:" + hashlib.sha256(store.blob_path(layer["digest"]).read_bytes()).hexdigest() == layer["digest"]


def test_index_config_and_manifests(built: tuple[LayoutStore, str]) -> None:
    store, digest = built
    index = _blob(store, digest)
    assert index["mediaType"] == MEDIA_INDEX and index["schemaVersion"] == 2
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64"},
    ]
    expected_ann = {ANN_SOURCE: "https://huggingface.co/org/synthetic", ANN_REVISION: COMMIT, ANN_TITLE: "synthetic"}
    assert index["annotations"] == expected_ann
    manifests = [_blob(store, m["digest"]) for m in index["manifests"]]
    assert all(m["mediaType"] == MEDIA_MANIFEST for m in manifests)
    assert manifests[0]["layers"] == manifests[1]["layers"]  # platforms share the layers
    for m, arch in zip(manifests, ["amd64", "arm64"], strict=True):
        assert m["annotations"] == expected_ann
        assert m["config"]["mediaType"] == MEDIA_CONFIG
        config = _blob(store, m["config"]["digest"])
        assert (config["os"], config["architecture"]) == ("linux", arch)
        assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"] for layer in m["layers"]]}
        assert len(config["history"]) == len(m["layers"])
        assert all(h["created"] == "1970-01-01T00:00:00Z" for h in config["history"])
        assert "Entrypoint" not in config["config"] and "Cmd" not in config["config"]


def test_layout_index_names_the_model_and_rebuild_replaces(tmp_path: Path) -> None:
    store, first = _build(tmp_path)
    assert store.refs()["synthetic"]["digest"] == first
    assert json.loads((tmp_path / "oci" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    (tmp_path / "src" / "config.json").write_bytes(b"{}")
    entry = _entry()
    entry.files[0] = LockedFile(path="config.json", size=2, sha256=hashlib.sha256(b"{}").hexdigest())
    layers = [LayerResult(p) for p in plan_layers([Member(f.path, f.size, f.sha256) for f in entry.files], TarParams())]
    second = write_image(
        store, "synthetic", entry, layers, FileSource.fixed(lambda p: tmp_path / "src" / p), TarParams()
    )
    assert second != first
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert [(m["annotations"]["org.opencontainers.image.ref.name"], m["digest"]) for m in index["manifests"]] == [
        ("synthetic", second)
    ]
    assert not list((tmp_path / "oci" / "blobs" / "sha256").glob(".upload.*"))


def test_a_file_of_exactly_16_mib_has_a_layer_of_its_own() -> None:
    """README: one layer per file of 16 MiB or more."""
    sizes = {"a.json": 10, "just-under.bin": LARGE_FILE - 1, "exactly.bin": LARGE_FILE}
    plans = plan_layers([Member(p, n, "0" * 64) for p, n in sizes.items()], TarParams())
    assert [[m.path for m in plan.members] for plan in plans] == [["a.json", "just-under.bin"], ["exactly.bin"]]
