"""kustomize overlays as modelcar reads and edits them: the base objects a patch is computed from,
the patches that already set a container's args, and the `patches:` list of kustomization.yaml.

kustomization.yaml is edited as text, one entry at a time, so the user's comments, order and
formatting stay; every other file is only read, and each once per run.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import yaml

from modelcar.catalog import Overlay, Target
from modelcar.errors import PatchError
from modelcar.lock import YAML_LOADER

API_VERSIONS = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "InferenceService": "serving.kserve.io/v1beta1",
}


class ParsedYaml:
    """The YAML files and inline patches one run reads, each parsed once. An overlay and its base
    are read for every model patched into them: parsed anew each time, 200 models sharing two
    overlays over one base took 74 s to patch and 267 s to check."""

    def __init__(self) -> None:
        self._files: dict[Path, list[dict[str, Any]]] = {}
        self._texts: dict[str, list[Any] | None] = {}
        self._patches: dict[Path, list[tuple[Any, Path | None, list[Any] | None]]] = {}

    def file(self, path: Path) -> list[dict[str, Any]]:
        """The mappings in a YAML file; a PatchError names a file that is not YAML."""
        key = path.resolve()
        if key not in self._files:
            try:
                docs = list(yaml.load_all(path.read_text(), Loader=YAML_LOADER))
            except yaml.YAMLError as exc:
                raise PatchError(f"{path}: not valid YAML ({exc})") from None
            self._files[key] = [d for d in docs if isinstance(d, dict)]
        return self._files[key]

    def text(self, text: str) -> list[Any] | None:
        """The documents of a YAML text; None if it is not YAML."""
        if text not in self._texts:
            try:
                self._texts[text] = list(yaml.load_all(text, Loader=YAML_LOADER))
            except yaml.YAMLError:
                self._texts[text] = None
        return self._texts[text]

    def patches(self, directory: Path, spec: dict[str, Any]) -> list[tuple[Any, Path | None, list[Any] | None]]:
        """Each patch the kustomization `spec` (in `directory`) lists: the entry, its file when
        the entry names one by `path:`, and its documents (None: not there, or not YAML)."""
        if directory not in self._patches:
            out: list[tuple[Any, Path | None, list[Any] | None]] = []
            for entry in [
                *(spec.get("patches") or []),
                *(spec.get("patchesStrategicMerge") or []),
                *(spec.get("patchesJson6902") or []),
            ]:
                text: str | None = None
                own: Path | None = None
                if isinstance(entry, str):  # patchesStrategicMerge: a file, or the patch inline
                    path = directory / entry
                    text = path.read_text() if "\n" not in entry and path.is_file() else entry
                elif isinstance(entry, dict) and isinstance(entry.get("patch"), str):
                    text = entry["patch"]
                elif isinstance(entry, dict) and isinstance(entry.get("path"), str):
                    path = directory / entry["path"]
                    if path.is_file():
                        own, text = path.resolve(), path.read_text()
                out.append((entry, own, None if text is None else self.text(text)))
            self._patches[directory] = out
        return self._patches[directory]


def _is_remote(entry: str) -> bool:
    return "://" in entry or entry.startswith(("github.com/", "git@")) or "?ref=" in entry


def _builds_on(spec: dict[str, Any]) -> list[Any]:
    """What a kustomization builds on, in kustomize's order: its resources (and the older `bases`),
    then its components (a component's patches apply before the kustomization's own)."""
    return [*(spec.get("resources") or []), *(spec.get("bases") or []), *(spec.get("components") or [])]


def base_objects(
    kustomization_dir: Path, parsed: ParsedYaml | None = None, seen: frozenset[Path] = frozenset()
) -> list[dict[str, Any]] | None:
    """The resources an overlay builds on, read from plain YAML files and nested kustomizations;
    None when some cannot be read here (remote bases, generators)."""
    parsed = parsed or ParsedYaml()
    kfile = kustomization_file(kustomization_dir)
    if kfile is None:
        return None
    doc = parsed.file(kfile)
    spec = doc[0] if doc else {}
    objects: list[dict[str, Any]] = []
    for entry in _builds_on(spec):
        if not isinstance(entry, str) or _is_remote(entry):
            return None
        target = (kustomization_dir / entry).resolve()
        if target in seen:
            continue
        if target.is_dir():
            nested = base_objects(target, parsed, seen | {target})
            if nested is None:
                return None
            objects += nested
        elif target.is_file():
            objects += parsed.file(target)
        else:
            return None
    return objects


ARG_KEYS = frozenset({"args", "command"})  # what modelcar's patch sets whole (args) or must read (command)


def _sets_args(node: Any, container: str) -> bool:
    """Whether a strategic-merge patch (or a value a JSON 6902 operation adds) sets `args` or
    `command` of the container named `container` (or of an unnamed one), or of KServe's model."""
    if isinstance(node, list):
        return any(_sets_args(item, container) for item in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        if key == "containers" and isinstance(value, list):
            if any(isinstance(c, dict) and c.get("name") in (None, container) and ARG_KEYS & c.keys() for c in value):
                return True
        elif (key == "model" and isinstance(value, dict) and ARG_KEYS & value.keys()) or _sets_args(value, container):
            return True
    return False


def _op_sets_args(op: Any, container: str) -> bool:
    """The same for one JSON 6902 operation: by its path (a container index cannot be told from
    its name here, so any container counts), or by the value it puts there."""
    if not isinstance(op, dict):
        return False
    segments = str(op.get("path", "")).split("/")
    if not {"containers", "model"} & set(segments):
        return False
    if ARG_KEYS & set(segments):
        return True
    value = op.get("value")
    if segments[-1] == "containers" or segments[-2:-1] == ["containers"]:
        return _sets_args({"containers": value if isinstance(value, list) else [value]}, container)
    return segments[-1] == "model" and _sets_args({"model": value}, container)


def _touches_args(doc: Any, container: str) -> bool:
    """Whether a patch document (strategic merge: a mapping; JSON 6902: a list of operations)
    sets the container's `args` or `command`."""
    if isinstance(doc, list):
        return any(_op_sets_args(op, container) for op in doc)
    return _sets_args(doc, container)


def _selects(pattern: Any, value: str) -> bool:
    """A kustomize selector field: absent, or an anchored regular expression (`raw-.*`)."""
    if pattern is None:
        return True
    try:
        return re.fullmatch(str(pattern), value) is not None
    except re.error:
        return str(pattern) == value


def _patch_targets(entry: Any, doc: Any, kind: str, name: str) -> bool:
    """Whether a kustomization patch entry may apply to `kind`/`name`: by its `target:` selector,
    or by the kind and name of a strategic-merge document without one."""
    selector = entry.get("target") if isinstance(entry, dict) else None
    if isinstance(selector, dict):
        return _selects(selector.get("kind"), kind) and _selects(selector.get("name"), name)
    if isinstance(doc, dict):
        return doc.get("kind") in (None, kind) and (doc.get("metadata") or {}).get("name") in (None, name)
    return True  # a JSON 6902 list without a selector: kustomize would refuse it, so would we


def argument_patches(
    kustomization_dir: Path,
    target: Target,
    container: str,
    ours: frozenset[Path] = frozenset(),
    parsed: ParsedYaml | None = None,
    seen: frozenset[Path] = frozenset(),
) -> list[Path]:
    """The kustomizations (the overlay, the local bases and components under it) with a patch of `target` that
    sets the container's args or command. modelcar reads the base's resources as written, not
    as patched, and its own patch sets `args` whole, last: such a patch would be lost silently.
    `ours`: patch files that give the args this patch gives too (this model's, in overlays the
    catalog gives no `args:`), not counted; another model's patch of the same container is."""
    parsed = parsed or ParsedYaml()
    kfile = kustomization_file(kustomization_dir)
    if kfile is None:
        return []
    docs = parsed.file(kfile)
    spec = docs[0] if docs else {}
    found: list[Path] = []
    for entry, own, patch_docs in parsed.patches(kustomization_dir, spec):
        if patch_docs is None or (own is not None and own in ours):
            continue  # this model's own, or not there, or not YAML (kustomize will say so)
        if any(_patch_targets(entry, d, target.kind, target.name) and _touches_args(d, container) for d in patch_docs):
            found.append(kfile)
    for base in _builds_on(spec):
        base_dir = (kustomization_dir / base).resolve() if isinstance(base, str) and not _is_remote(base) else None
        if base_dir is not None and base_dir.is_dir() and base_dir not in seen:
            found += argument_patches(base_dir, target, container, ours, parsed, seen | {base_dir})
    return found


KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")  # kustomize's, in its order


def kustomization_file(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


# --- kustomization.yaml -------------------------------------------------------------------------


def _entry_lines(patch_name: str, overlay: Overlay, indent: str) -> list[str]:
    target = overlay.target
    group = API_VERSIONS.get(target.kind, "").rpartition("/")[0]
    lines = [f"{indent}- path: {patch_name}", f"{indent}  target:"]
    if group:
        lines.append(f"{indent}    group: {group}")
    lines += [f"{indent}    kind: {target.kind}", f"{indent}    name: {target.name}"]
    return lines


def _top_level_key(line: str) -> str | None:
    match = re.match(r"^([A-Za-z_][\w-]*)\s*:", line)
    return match.group(1) if match else None


def _value_and_comment(line: str) -> tuple[str, str]:
    """`patches: []  # none yet` -> ("[]", "# none yet")."""
    rest = line.split(":", 1)[1]
    value, hash_, comment = rest.partition(" #")
    if not hash_ and rest.strip().startswith("#"):
        return "", rest.strip()
    return value.strip(), (f"#{comment}".strip() if hash_ else "")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _patches_block(lines: list[str]) -> tuple[int, int, list[int], str] | None:
    """The `patches:` block of a kustomization's lines: its key's line, the line after its last
    item, the lines its items start on and their indent; None without one."""
    start = next((i for i, line in enumerate(lines) if _top_level_key(line) == "patches"), None)
    if start is None:
        return None
    value, _ = _value_and_comment(lines[start])
    if value not in ("", "[]", "~", "null"):
        raise PatchError("patches: written in flow style; write it as a block list, whose entries modelcar edits")
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t-#"):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    items = [i for i in range(start + 1, end) if lines[i].lstrip().startswith("- ")]
    indent = _indent(lines[items[0]]) if items else "  "
    items = [i for i in items if _indent(lines[i]) == indent]
    return start, end, items, indent


def _names(chunk: list[str], patch_name: str) -> bool:
    """Whether a `patches` item's lines are the entry for `patch_name`, however a hand wrote it: a
    comment after the path, `./` before it, quotes, the item in flow style (`- {path: ...}`). Read
    as YAML, not matched as text: an entry missed was added twice, or left naming a file `--prune`
    removed (an overlay that no longer builds). An item whose text does not hold the file's name is
    not parsed: one overlay serving 800 models parsed every item for every model (19 s)."""
    text = "\n".join(chunk)
    if posixpath.basename(patch_name) not in text:
        return False
    try:
        item = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError:
        return False
    path = item[0].get("path") if isinstance(item, list) and len(item) == 1 and isinstance(item[0], dict) else None
    return isinstance(path, str) and posixpath.normpath(path) == patch_name


def _entry_lines_at(lines: list[str], items: list[int], end: int, patch_name: str) -> tuple[int, int] | None:
    """The lines of the item whose `path:` is `patch_name` (the comments that follow it belong to
    the next one), or None."""
    for n, i in enumerate(items):
        item_end = items[n + 1] if n + 1 < len(items) else end
        chunk = lines[i:item_end]
        if _names(chunk, patch_name):
            while len(chunk) > 1 and (not chunk[-1].strip() or chunk[-1].lstrip().startswith("#")):
                chunk.pop()
            return i, i + len(chunk)
    return None


def edit_kustomization(text: str, patch_name: str, overlay: Overlay) -> str:
    """`text` with one `patches` entry for `patch_name` (added, or replaced when its target
    changed); every other line kept as it is, comments, order and line endings included."""
    eol = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    block = _patches_block(lines)
    if block is None:
        while lines and not lines[-1].strip():
            lines.pop()
        return eol.join([*lines, "patches:", *_entry_lines(patch_name, overlay, "  ")]) + eol
    start, end, items, indent = block
    new = _entry_lines(patch_name, overlay, indent)
    found = _entry_lines_at(lines, items, end, patch_name)
    if found is not None:
        return eol.join([*lines[: found[0]], *new, *lines[found[1] :]]) + eol
    value, comment = _value_and_comment(lines[start])
    if value:  # `patches: []`, `patches: ~`: a block list from now on
        lines[start] = "patches:" + (f"  {comment}" if comment else "")
    return eol.join([*lines[:end], *new, *lines[end:]]) + eol


def remove_kustomization_entry(text: str, patch_name: str) -> str:
    """`text` without the `patches` entry for `patch_name`; every other line kept as it is."""
    lines = text.splitlines()
    block = _patches_block(lines)
    found = _entry_lines_at(lines, block[2], block[1], patch_name) if block is not None else None
    if found is None:
        return text
    eol = "\r\n" if "\r\n" in text else "\n"
    lines = [*lines[: found[0]], *lines[found[1] :]]
    if (left := _patches_block(lines)) is not None and not left[2]:  # the last entry gone
        start, end = left[0], left[1]
        if _value_and_comment(lines[start]) == ("", "") and not any(x.strip() for x in lines[start + 1 : end]):
            del lines[start:end]  # nothing of the user's with the key: no bare `patches:` (null) left behind
    return eol.join(lines) + eol
