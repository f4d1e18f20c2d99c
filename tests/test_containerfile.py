"""The Containerfile renderer: pure checks, then buildah builds compared with modelcar's own image.

The buildah tests build with chroot isolation and vfs storage in a temp directory (no daemon, no
shared state), export with `buildah push oci:`, and unpack both images with `umoci unpack
--rootless`: the /models trees must match in names, sizes, bytes and modes, layer by layer.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelcar.build import build_models
from modelcar.catalog import load_catalog
from modelcar.containerfile import STAGE, render_containerfile
from modelcar.image import LARGE_FILE, plan_layers
from modelcar.lock import LockedFile, LockedModel, read_lock
from modelcar.tarlayer import Member, TarParams
from tests.conftest import Cli, missing, require_tool, write_catalog

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "containerfiles" / "modelcar.Containerfile"
BUSYBOX_BASE = REPO / "containerfiles" / "busybox-base"
SHA = "0" * 64
COMMIT = "1" * 40


def _entry(files: dict[str, int], source: str = "path://models/m") -> LockedModel:
    return LockedModel(
        source=source,
        commit=COMMIT,
        files=[LockedFile(path=p, size=s, sha256=SHA) for p, s in files.items()],
    )


def _unescape(word: str) -> str:
    """What the builders' lexer makes of a word in unquoted context: a backslash escapes the next character."""
    return re.sub(r"\\(.)", r"\1", word)


def _copies(text: str) -> list[tuple[str, str, str]]:
    """(flags, source, destination) of every COPY, as the builders read them."""
    out = []
    for line in text.splitlines():
        if m := re.fullmatch(r"COPY ((?:--\S+ )*)(\[.*\])", line):
            src, dest = json.loads(m.group(2))
            out.append((m.group(1).strip(), _unescape(src), _unescape(dest)))
    return out


def _stages(text: str) -> list[str]:
    """The Containerfile cut at each FROM."""
    return re.split(r"(?m)^(?=FROM )", text)[1:]


# --- the renderer -------------------------------------------------------------------------------

SPLIT_FILES = {
    "config.json": 700,
    "z-last.json": 10,
    "nested/deep/tokenizer.json": 5000,
    "almost.safetensors": LARGE_FILE - 1,
    "weights/b.safetensors": LARGE_FILE,
    "a.safetensors": 3 * LARGE_FILE,
}


def test_layer_split_is_plan_layers() -> None:
    entry = _entry(SPLIT_FILES)
    text = render_containerfile("m", entry)
    stage, final = _stages(text)
    plans = plan_layers([Member(p, s, SHA) for p, s in SPLIT_FILES.items()], TarParams())

    assert stage.startswith(f"FROM scratch AS {STAGE}\n")
    staged = [src for _, src, _ in _copies(stage)]
    assert staged == [m.path for m in plans[0].members]
    assert staged == ["almost.safetensors", "config.json", "nested/deep/tokenizer.json", "z-last.json"]
    # Every directory exists before any COPY --chmod could create one (leaves only: WORKDIR makes parents).
    assert re.findall(r"(?m)^WORKDIR (.*)$", stage) == ['"/models/nested/deep"', '"/models/weights"']
    assert stage.index("WORKDIR") < stage.index("COPY")

    assert final.startswith("FROM scratch\n")
    copies = _copies(final)
    assert copies[0] == (f"--from={STAGE}", "/models", "/models")
    assert [src for _, src, _ in copies[1:]] == [p.members[0].path for p in plans[1:]]
    assert [src for _, src, _ in copies[1:]] == ["a.safetensors", "weights/b.safetensors"]
    assert len(copies) == len(plans)  # one COPY per modelcar layer, nothing else makes a layer
    assert not re.search(r"(?m)^(RUN|WORKDIR|ADD) ", final)
    for flags, src, dest in _copies(text):
        if flags != f"--from={STAGE}":
            assert flags == "--chmod=0644" and dest == f"/models/{src}"


def test_large_file_threshold_follows_the_native_build() -> None:
    entry = _entry({"config.json": 10, "model.safetensors": 2000})
    assert len(_copies(_stages(render_containerfile("m", entry))[1])) == 1
    assert len(_copies(_stages(render_containerfile("m", entry, large_file=1000))[1])) == 2


def test_without_small_files_the_first_large_file_is_staged() -> None:
    entry = _entry({"b/2.safetensors": LARGE_FILE, "a/1.safetensors": LARGE_FILE})
    stage, final = _stages(render_containerfile("m", entry))
    assert [src for _, src, _ in _copies(stage)] == ["a/1.safetensors"]
    assert re.findall(r"(?m)^WORKDIR (.*)$", stage) == ['"/models/a"', '"/models/b"']
    assert [src for _, src, _ in _copies(final)] == ["/models", "b/2.safetensors"]


def test_paths_with_spaces_quotes_and_dollars_survive_the_lexer() -> None:
    names = ["a b/c d.json", "it's.json", 'say "hi".json', "$HOME.json", "${X}/y.json", "#1;&|<>{}~%,.json", "ünï.json"]
    text = render_containerfile("m", _entry(dict.fromkeys(names, 1)))
    got = [(src, dest) for _, src, dest in _copies(text) if not src.startswith("/")]
    assert got == [(n, f"/models/{n}") for n in sorted(names)]
    workdirs = [_unescape(w[1:-1]) for w in re.findall(r"(?m)^WORKDIR (.*)$", text)]
    assert workdirs == ["/models/${X}", "/models/a b"]


@pytest.mark.parametrize(
    "path", ["a*.json", "w?.bin", "br[1].json", "back\\slash", "new\nline", "tab\t", "../up", "/abs"]
)
def test_paths_builders_cannot_copy_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"path|Containerfile"):
        render_containerfile("m", _entry({path: 1}))


def test_control_characters_never_reach_the_file() -> None:
    with pytest.raises(ValueError, match="control characters"):
        render_containerfile("m\nRUN evil", _entry({"config.json": 1}))
    with pytest.raises(ValueError, match="control characters"):
        render_containerfile("m", _entry({"config.json": 1}, source="path://x\nRUN evil"))


def test_base_is_the_final_stage_and_must_be_pinned() -> None:
    entry = _entry({"config.json": 1})
    base = "ghcr.io/acme/modelcar-busybox@sha256:" + "a" * 64
    stage, final = _stages(render_containerfile("m", entry, base=base))
    assert stage.startswith("FROM scratch AS ") and final.startswith(f"FROM {base}\n")
    assert "data only" in render_containerfile("m", entry)
    for bad in [
        "busybox:latest",
        "busybox",
        "x@sha256:abc",
        "x@sha256:" + "a" * 64 + "\nRUN evil",
        "x@sha256:" + "a" * 64 + "\n",
    ]:
        with pytest.raises(ValueError, match="pinned by digest"):
            render_containerfile("m", entry, base=bad)
    # a base the native build reads from a local layout or archive: no FROM a builder takes names it
    for local in ["oci:/srv/base:busybox@sha256:" + "a" * 64, "oci-archive:/srv/b.tar:busybox@sha256:" + "a" * 64]:
        with pytest.raises(ValueError, match="local OCI layout or archive, which a Containerfile's FROM cannot name"):
            render_containerfile("m", entry, base=local)


def test_labels_carry_the_image_annotations() -> None:
    entry = _entry({"config.json": 1}, source="hf://Qwen/Qwen2.5-0.5B-Instruct")
    entry.include = ["*.json"]
    text = render_containerfile("qwen", entry, params=TarParams(mtime=1700000000))
    label = re.search(r"(?ms)^LABEL (.*?)(?<!\\)\n", text)
    assert label is not None
    pairs = dict(re.findall(r'(\S+)="((?:[^"\\]|\\.)*)"', label.group(1)))
    assert pairs == {
        "org.opencontainers.image.source": "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct",
        "org.opencontainers.image.revision": COMMIT,
        "org.opencontainers.image.title": "qwen",
    }
    assert f"hf download Qwen/Qwen2.5-0.5B-Instruct --revision {COMMIT} --local-dir CONTEXT --include '*.json'" in text
    assert "--timestamp 1700000000" in text


def test_reference_containerfile_is_what_the_command_prints(cli: Cli) -> None:
    entry = read_lock(REPO / "examples" / "catalog.lock").models["tiny-chat"]
    expected = render_containerfile("tiny-chat", entry)
    printed = cli("containerfile", "tiny-chat", "-c", REPO / "examples" / "catalog.yaml").stdout
    assert printed == expected
    assert REFERENCE.read_text(encoding="utf-8") == expected, (
        f"{REFERENCE.relative_to(REPO)} is stale; regenerate it with:\n"
        "  modelcar containerfile tiny-chat -c examples/catalog.yaml > containerfiles/modelcar.Containerfile"
    )


def test_containerfile_needs_a_locked_model(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command a hint names is the one to type next: with this run's catalog where it is not
    ./catalog.yaml (quoted for a shell), as it is where it is."""
    (tmp_path / "my models" / "m").mkdir(parents=True)
    (tmp_path / "my models" / "m" / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "my models" / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    result = cli("containerfile", "m", "-c", cat, "--json", code=2)
    hint = f"{cat.with_suffix('.lock')}: m is not locked: run `modelcar lock m -c '{cat}'` first"
    assert f"error: {hint}\n" == result.stderr and json.loads(result.stdout) == {"error": hint}
    monkeypatch.chdir(cat.parent)
    result = cli("containerfile", "m", code=2)
    assert result.stderr == "error: catalog.lock: m is not locked: run `modelcar lock m` first\n"


def test_containerfile_of_a_file_it_cannot_copy_is_one_line_naming_the_model(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "we[ird].json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    result = cli("containerfile", "m", "-c", cat, code=2)
    assert result.stderr.startswith(f"error: {cat}: m: 'we[ird].json': a Containerfile cannot COPY this path")
    assert len(result.stderr.splitlines()) == 1


def test_containerfile_json(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    doc = json.loads(cli("containerfile", "m", "-c", cat, "--json").stdout)
    assert doc == {"name": "m", "containerfile": cli("containerfile", "m", "-c", cat).stdout}


# --- buildah, umoci, skopeo ---------------------------------------------------------------------

Run = Callable[..., subprocess.CompletedProcess[str]]


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, f"{' '.join(map(str, args))}: exit {result.returncode}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """`buildah` with its own vfs storage: no daemon, nothing shared with other runs."""
    exe = require_tool("buildah")
    storage = tmp_path_factory.mktemp("buildah")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return _run(exe, "--root", storage / "root", "--runroot", storage / "run", "--storage-driver", "vfs", *args)

    yield run
    subprocess.run(
        [exe, "--root", storage / "root", "--runroot", storage / "run", "--storage-driver", "vfs", "rm", "--all"],
        capture_output=True,
    )
    shutil.rmtree(storage, ignore_errors=True)


def _tree(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry under root: kind, permission bits, size, sha256 of a file's bytes."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), 0, "")
        elif stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
        else:
            out[rel] = ("other", stat.S_IMODE(st.st_mode), 0, "")
    return out


def _manifest(layout: Path, ref: str) -> dict:  # type: ignore[type-arg]
    """The image manifest a layout names `ref` (the first platform's, behind an index)."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
    ]
    while True:
        doc = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes())
        if "layers" in doc:
            return doc  # type: ignore[no-any-return]
        desc = doc["manifests"][0]


def _layer_files(layout: Path, ref: str) -> list[list[str]]:
    """The regular files each layer of an image carries, layer by layer."""
    out = []
    for layer in _manifest(layout, ref)["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
        with tarfile.open(blob, mode="r:*") as tar:
            out.append(sorted(m.name.removeprefix("./").lstrip("/") for m in tar.getmembers() if m.isreg()))
    return out


def _unpack(layout: Path, ref: str, dest: Path) -> Path:
    _run(require_tool("umoci"), "unpack", "--rootless", "--image", f"{layout}:{ref}", dest)
    return dest / "rootfs"


BIG = bytes(range(256)) * (LARGE_FILE // 256) + b"!" * 1000  # just over 16 MiB
MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "tokenizer.json": b'{"version": "1.0"}\n',
    "chat template/it's $HOME #1.jinja": b"{{ messages }}\n",
    "nested/deep/\u00fcn\u00ef.txt": b"unicode\n",
    "model-00002-of-00002.safetensors": b"\x07" * LARGE_FILE,  # exactly the threshold: a layer of its own
    "weights/model-00001-of-00002.safetensors": BIG,
}


def _write_model(root: Path) -> None:
    for rel, data in MODEL_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # Modes on disk must not reach either image.
    (root / "config.json").chmod(0o600)
    (root / "tokenizer.json").chmod(0o755)
    (root / "chat template").chmod(0o700)
    (root / "nested").chmod(0o750)


def test_buildah_build_of_the_rendered_containerfile_equals_modelcar_build(tmp_path: Path, buildah: Run) -> None:
    skopeo = require_tool("skopeo")
    require_tool("umoci")
    _write_model(tmp_path / "model")
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: synth\n    path: ./model\n"))
    (result,) = build_models(catalog, layout=tmp_path / "native", params=TarParams())
    assert len(result.layers) == 3
    one = tmp_path / "native-one"
    _run(skopeo, "copy", "--preserve-digests", f"oci:{tmp_path / 'native'}:synth", f"oci:{one}:synth")

    entry = read_lock(tmp_path / "catalog.lock").models["synth"]
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text(render_containerfile("synth", entry), encoding="utf-8")
    built = tmp_path / "buildah-oci"
    buildah(
        "build",
        "--layers",
        "--timestamp",
        "0",
        "--isolation",
        "chroot",
        "-f",
        containerfile,
        "-t",
        "localhost/synth",
        tmp_path / "model",
    )
    buildah("push", "localhost/synth", f"oci:{built}:synth")

    native_root = _unpack(one, "synth", tmp_path / "native-bundle")
    buildah_root = _unpack(built, "synth", tmp_path / "buildah-bundle")
    assert sorted(p.name for p in buildah_root.iterdir()) == ["models"]
    native_tree, buildah_tree = _tree(native_root / "models"), _tree(buildah_root / "models")
    assert buildah_tree == native_tree
    assert {rel for rel, (kind, *_) in native_tree.items() if kind == "file"} == set(MODEL_FILES)
    assert {mode for kind, mode, *_ in native_tree.values() if kind == "dir"} == {0o755}
    assert {mode for kind, mode, *_ in native_tree.values() if kind == "file"} == {0o644}

    native_layers, buildah_layers = _layer_files(one, "synth"), _layer_files(built, "synth")
    assert buildah_layers == native_layers
    assert native_layers == [
        [
            "models/chat template/it's $HOME #1.jinja",
            "models/config.json",
            "models/nested/deep/\u00fcn\u00ef.txt",
            "models/tokenizer.json",
        ],
        ["models/model-00002-of-00002.safetensors"],
        ["models/weights/model-00001-of-00002.safetensors"],
    ]

    config = json.loads(_run(skopeo, "inspect", "--config", f"oci:{built}:synth").stdout)
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.source"] == "path://model"
    assert labels["org.opencontainers.image.revision"] == entry.commit
    assert labels["org.opencontainers.image.title"] == "synth"


def _static_busybox() -> Path:
    """Debian's busybox-static /bin/busybox: it must run in an image with no libc."""
    found = shutil.which("busybox") or "/bin/busybox"
    path = Path(found)
    message = "a static busybox is not installed (Debian package busybox-static; scripts/test.sh installs it as root)"
    if not path.is_file() or _elf_interpreter(path):
        missing(message)
    return path


def _elf_interpreter(path: Path) -> bool:
    """Whether an ELF executable names a dynamic loader (a PT_INTERP program header): not static."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return True
    endian = "<" if data[5] == 1 else ">"
    phoff = struct.unpack_from(endian + "Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    return any(struct.unpack_from(endian + "I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_busybox_base_runs_a_shell_and_carries_a_modelcar(tmp_path: Path, buildah: Run) -> None:
    busybox = _static_busybox()
    context = tmp_path / "busybox-base"
    shutil.copytree(BUSYBOX_BASE, context)
    shutil.copy(busybox, context / "busybox")
    buildah(
        "build",
        "--layers",
        "--timestamp",
        "0",
        "--isolation",
        "chroot",
        "-f",
        context / "Containerfile",
        "-t",
        "localhost/modelcar-busybox",
        context,
    )

    container = buildah("from", "--pull=never", "localhost/modelcar-busybox").stdout.strip()
    try:
        out = buildah(
            "run", "--isolation", "chroot", container, "--",
            "sh", "-c", "echo ok; id -u; for a in sh cp ln ls mkdir sleep cat; do which $a; done; stat -c %a /tmp",
        ).stdout.split()  # fmt: skip
    finally:
        buildah("rm", container)
    assert out == ["ok", "65532", *(f"/bin/{a}" for a in ["sh", "cp", "ln", "ls", "mkdir", "sleep", "cat"]), "1777"]

    # The example model on top of it, FROM the base by digest: what KServe's sidecar and init-copy run.
    digest = buildah("images", "--format", "{{.Digest}}", "localhost/modelcar-busybox").stdout.split()[0]
    entry = read_lock(REPO / "examples" / "catalog.lock").models["tiny-chat"]
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text(render_containerfile("tiny-chat", entry, base=f"localhost/modelcar-busybox@{digest}"))
    buildah(
        "build",
        "--pull=never",
        "--layers",
        "--isolation",
        "chroot",
        "-f",
        containerfile,
        "-t",
        "localhost/tiny-chat",
        REPO / "examples" / "models" / "tiny-chat",
    )
    container = buildah("from", "--pull=never", "localhost/tiny-chat").stdout.strip()
    try:
        copied = buildah(
            "run", "--isolation", "chroot", container, "--",
            "sh", "-c", "mkdir /tmp/mnt && cp -r /models/. /tmp/mnt/ && cd /tmp/mnt && sha256sum *",
        ).stdout  # fmt: skip
    finally:
        buildah("rm", container)
    assert sorted(line.split()[::-1] for line in copied.splitlines()) == sorted([f.path, f.sha256] for f in entry.files)
