"""A Containerfile equivalent to modelcar's native build, for pipelines that must use buildah or Kaniko.

Some teams may only build images with the builder their CI platform blesses (buildah on OpenShift
and Tekton, Kaniko on GitLab and in-cluster runners) and may not run a tool that writes OCI
layouts or talks to a registry itself. For them `render_containerfile` writes a Containerfile
whose build, with the model's files as the build context, gives the same `/models` tree as
`modelcar build` (DESIGN.md section 5): the same names, sizes and bytes, mode 0644 for every file
and 0755 for every directory, and the same layer split, which `modelcar.image.plan_layers`
decides for both: all small files together in one first layer, then one layer per file of
16 MiB or more, in path order. The digests differ (a builder writes its own tar headers, mtimes
and config), so pin what the builder pushed, not the digest in the lock.

How the text gets there, and why:
- Every copy names one file (JSON form, so spaces need no quoting) with `--chmod=0644`: the
  files' modes on disk never reach the image.
- Directories are never left to `COPY --chmod` to create. Builders disagree about the mode of the
  parent directories a `COPY --chmod=0644` creates: buildah makes them 0755, but Docker since
  28.1 (BuildKit with tonistiigi/fsutil#228) and Kaniko 1.23 give them the 0644 of the file,
  and nobody can enter them. So a first stage creates every directory of the tree with
  `WORKDIR` (0755 in all of them) and copies the small files into it; the image takes that
  stage's `/models` in one `COPY --from` (modes kept, no `--chmod`), which is the first layer,
  and the large files then land in directories that already exist. A model without small files
  stages its first large file instead, so the split stays the same.
- Copy sources are globs to the builders and the words go through their shell-like lexer, so `$`
  and quotes are escaped; `*`, `?`, `[` and `\\` cannot be escaped for buildah 1.28 (its copier
  expands the matched path as a glob a second time), so such paths are refused, as are control
  characters.
- Only `COPY`, `WORKDIR` and `LABEL`: no `RUN`, no shell, so `FROM scratch` works and Kaniko needs
  nothing from the image. `LABEL`s carry the source, revision and title that modelcar writes as
  annotations.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import PurePosixPath

from modelcar.catalog import DIGEST_REF_RE, Catalog
from modelcar.errors import InputError, NotLocked
from modelcar.image import LARGE_FILE, ImageMeta, LayerPlan, plan_layers
from modelcar.lock import LockedModel, read_lock
from modelcar.tarlayer import FILE_MODE, ROOT, Member, TarParams, member_name

STAGE = "modelcar-files"
_UNSAFE_PATH = re.compile(r"[*?\[\\\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_path(path: str) -> str:
    member_name(path)  # rejects absolute paths, `.`/`..` components and NUL, as the native build does
    if _UNSAFE_PATH.search(path):
        raise ValueError(
            f"{path!r}: a Containerfile cannot COPY this path reliably (buildah and Kaniko read *, ?, [ and \\ "
            "in a source as glob syntax, and control characters break the file); build it with `modelcar build`"
        )
    return path


def _word(text: str) -> str:
    """A word for the builders' lexer, unquoted context: `\\`, `$` and quotes lose their meaning."""
    return re.sub(r"""([\\$'"])""", r"\\\1", text)


def _quoted(text: str) -> str:
    """A double-quoted word for the lexer (WORKDIR, LABEL): only `\\`, `$` and `"` are special inside."""
    if _CONTROL.search(text):
        raise ValueError(f"{text!r}: control characters cannot be written into a Containerfile")
    return '"' + re.sub(r'([\\$"])', r"\\\1", text) + '"'


def _copy(src: str, dest: str, *, chmod: int | None = FILE_MODE, stage: str | None = None) -> str:
    flags = f"--from={stage} " if stage else ""
    flags += f"--chmod={chmod:04o} " if chmod is not None else ""
    return f"COPY {flags}{json.dumps([_word(src), _word(dest)], ensure_ascii=False)}"


def _dest(path: str) -> str:
    return "/" + member_name(path)


def _directories(members: Sequence[Member]) -> list[str]:
    """Every directory under the image root that holds a file, leaves only (WORKDIR makes parents)."""
    dirs = {PurePosixPath(_dest(m.path)).parent for m in members}
    leaves = {d for d in dirs if not any(d in other.parents for other in dirs)}
    return sorted(d.as_posix() for d in leaves)


def _header(name: str, entry: LockedModel, base: str | None, params: TarParams) -> list[str]:
    kind, _, where = entry.source.partition("://")
    lines = [
        f"# modelcar image of {name}: {entry.source} at {entry.commit}",
        "# Rendered from the lock by modelcar.containerfile.render_containerfile; render again after `modelcar lock`.",
        "# The same /models tree and layer split as `modelcar build`; the digests are the builder's own.",
        "#",
        "# Build context: a directory holding the model's files as regular files.",
    ]
    if kind == "hf":
        fetch = ["hf", "download", where, "--revision", entry.commit, "--local-dir", "CONTEXT"]
        for pattern in entry.include:
            fetch += ["--include", pattern]
        for pattern in entry.exclude:
            fetch += ["--exclude", pattern]
        lines += [
            "# (Not a Hugging Face cache snapshot directory: its files are symlinks out of the context.)",
            f"#   {shlex.join(fetch)}",
        ]
    else:
        lines += [
            f"#   CONTEXT = the model directory ({entry.source}, relative to the catalog); one whose files",
            "#   link out of it (a Hugging Face snapshot directory) copied first: cp -rL DIR CONTEXT",
        ]
    lines += [
        "# Build (--layers keeps one layer per COPY; without it buildah squashes them into one):",
        f"#   buildah build --layers --timestamp {params.mtime} -f Containerfile -t IMAGE CONTEXT",
        "#   kaniko: executor --context dir://CONTEXT --dockerfile Containerfile --reproducible --destination IMAGE",
        "# One build is one platform's image; `modelcar build` writes an index of every platform (linux/amd64",
        "# and linux/arm64, a base's, or the catalog's `platforms:`). Build once a platform into one list:",
        f"#   buildah build --layers --no-cache --timestamp {params.mtime} --platform P --manifest IMAGE"
        " -f Containerfile CONTEXT",
        "#   buildah manifest push --all IMAGE docker://IMAGE",
    ]
    if base is None:
        lines.append("# No base image: data only (image volumes, KServe oci+native/oci+fetch).")
    else:
        lines.append("# On a base image with a shell (KServe modelcar sidecar, init-copy).")
    for line in lines:
        if _CONTROL.search(line):
            raise ValueError(f"{line!r}: control characters cannot be written into a Containerfile")
    return lines


def render_containerfile(
    name: str,
    entry: LockedModel,
    *,
    base: str | None = None,
    params: TarParams | None = None,
    large_file: int = LARGE_FILE,
) -> str:
    """The Containerfile of one locked model (see the module docstring for what it guarantees).

    `base` is the image the model layers go on, pinned by digest (`REPOSITORY@sha256:...`), or None
    for `FROM scratch`. `params` and `large_file` are the native build's: the same values give the
    same layer plan. Raises ValueError for a base that is not pinned by digest and for paths no
    builder can copy reliably.
    """
    params = params or TarParams()
    if base is not None and base.startswith(("oci:", "oci-archive:")):  # modelcar's own store names
        raise ValueError(
            f"base {base!r} is a local OCI layout or archive, which a Containerfile's FROM cannot name (buildah "
            "reads no image by digest there, Kaniko no layout at all): push the base to a registry and name it "
            "REPOSITORY@sha256:..."
        )
    if base is not None and not DIGEST_REF_RE.fullmatch(base):  # fullmatch: `$` would allow a final newline
        raise ValueError(f"base {base!r} must be pinned by digest: REPOSITORY@sha256:<64 hex>")
    members = entry.members
    for m in members:
        _check_path(m.path)
    plans: list[LayerPlan] = plan_layers(members, params, large_file)
    staged, direct = plans[0], plans[1:]

    lines = _header(name, entry, base, params)
    lines += ["", f"FROM scratch AS {STAGE}"]
    lines += [f"WORKDIR {_quoted(d)}" for d in _directories(members)]
    lines += [_copy(m.path, _dest(m.path)) for m in staged.members]

    lines += ["", f"FROM {base or 'scratch'}"]
    meta = ImageMeta.of(name, entry.source, entry.commit).annotations()
    labels = [f"{key}={_quoted(value)}" for key, value in meta.items()]
    lines.append("LABEL " + " \\\n      ".join(labels))
    lines.append(f"# layer 1: {staged.description}, and every directory")
    lines.append(_copy(f"/{ROOT}", f"/{ROOT}", chmod=None, stage=STAGE))
    for number, plan in enumerate(direct, start=2):
        (m,) = plan.members
        lines.append(f"# layer {number}: {m.path} ({m.size} bytes)")
        lines.append(_copy(m.path, _dest(m.path)))
    return "\n".join(lines) + "\n"


def catalog_containerfile(catalog: Catalog, name: str) -> str:
    """The Containerfile of the catalog's model `name` as the lock pins it; an InputError naming
    the file and the model for one that a Containerfile cannot carry, NotLocked for one not locked."""
    (spec,) = catalog.select([name])
    entry = read_lock(catalog.lock_file).models.get(spec.name)
    if entry is None:
        raise NotLocked(f"{catalog.lock_file}: {spec.name} is not locked: run `modelcar lock {spec.name}` first")
    try:
        return render_containerfile(spec.name, entry, base=spec.base)
    except ValueError as exc:  # a file name or base a Containerfile cannot carry
        raise InputError(f"{catalog.file}: {spec.name}: {exc}") from None
