"""A real container runtime unpacks what modelcar builds, as a node does for an image volume.

A kubelet hands an image volume's reference to its runtime, which pulls the image and unpacks its
layers; the pod sees the result, not the tar. Debian's containerd (1.6; no image volumes of its
own, but the same pull and unpack) runs here with its own root and socket, the CRI plugin off and
the `native` snapshotter (plain directories, whatever the file system), and the unpacked tree is
read where `ctr images mount` binds it. Needs root, as containerd does. (Not the kubelet's path
itself: with the CRI plugin off, images land in a namespace of the test's, not `k8s.io`.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Cli, missing, require_tool, write_catalog
from tests.registry import Registry

SNAPSHOTTER = "native"
FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "model.safetensors": os.urandom(17 << 20),  # a layer of its own (LARGE_FILE is 16 MiB)
    "empty.txt": b"",
    "tokenizer/vocab é.json": b'{"a": 1}\n',
    "deep/er/still/notes.md": b"# notes\n",
}


class Containerd:
    """One containerd daemon of the test run's own, driven through `ctr`."""

    def __init__(self, root: Path) -> None:
        binary, self.ctr_bin = require_tool("containerd"), require_tool("ctr")
        if os.geteuid() != 0:
            missing("containerd needs root (CI runs the tests as root)")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.address = str(root / "containerd.sock")
        config = root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{root / "root"}"\n'
            f'state = "{root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
        )
        self.log = root / "containerd.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "--config", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while subprocess.run([self.ctr_bin, "--address", self.address, "version"], capture_output=True).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def ctr(self, namespace: str, *args: str) -> str:
        result = subprocess.run(
            [self.ctr_bin, "--address", self.address, "--namespace", namespace, *args], capture_output=True, text=True
        )
        assert result.returncode == 0, f"ctr {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    @contextmanager
    def mounted(self, namespace: str, ref: str, platform: str, target: Path) -> Iterator[Path]:
        """The image's unpacked tree, as the runtime made it for `platform`, mounted read-only at
        `target` (its snapshot held by a lease until unmounted: a bare view is garbage-collected)."""
        target.mkdir()
        self.ctr(namespace, "images", "mount", "--snapshotter", SNAPSHOTTER, "--platform", platform, ref, str(target))
        try:
            yield target
        finally:
            self.ctr(namespace, "images", "unmount", "--rm", str(target))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    yield daemon
    daemon.stop()


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under `root`: relative path -> (the sha256 of a file, "dir" or "other"; its mode),
    all of them owned by root (whoever owned the model's files)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            kind = "other"
        else:
            kind = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        found[path.relative_to(root).as_posix()] = (kind, st.st_mode & 0o7777)
    return found


def test_containerd_unpacks_exactly_the_model_for_every_platform(
    cli: Cli, containerd: Containerd, registry: Registry, tmp_path: Path
) -> None:
    model = tmp_path / "m"
    for rel, data in FILES.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_bytes(data)
    (model / "config.json").chmod(0o600)  # the user's modes and owner do not reach the image: any uid reads it
    os.chown(model / "config.json", 1000, 1000)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    path: ./m\n")
    prefix = f"{registry.host}/{registry.unique_repo()}"
    cli("build", "-c", cat, "--push", "--registry", prefix)
    digest = json.loads(cli("inspect", "tiny", "-c", cat, "--json").stdout)["digest"]
    ref = f"{prefix}/tiny@{digest}"

    expected = {"models": ("dir", 0o755)}
    for rel, data in FILES.items():
        parts = rel.split("/")
        expected |= {"/".join(["models", *parts[:i]]): ("dir", 0o755) for i in range(1, len(parts))}
        expected[f"models/{rel}"] = (hashlib.sha256(data).hexdigest(), 0o644)
    for platform in ("linux/amd64", "linux/arm64"):
        namespace = platform.replace("/", "-")
        containerd.ctr(
            namespace, "images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, "--platform", platform, ref
        )
        with containerd.mounted(namespace, ref, platform, tmp_path / namespace) as root:
            assert _tree(root) == expected, platform

    # An archive imported on a node with no registry, under the name the patch pins (README).
    archive = tmp_path / "tiny.tar"
    cli("mirror", "-c", cat, "--from", prefix, "--to", f"oci-archive:{archive}", "tiny")
    out = containerd.ctr(
        "import",
        "images",
        "import",
        "--digests",
        "--base-name",
        f"{prefix}/tiny",
        "--snapshotter",
        SNAPSHOTTER,
        str(archive),
    )
    assert ref in containerd.ctr("import", "images", "ls", "-q").split(), out
