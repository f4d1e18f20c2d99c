"""The catalog: which models a platform serves, from where, and into which overlays.

The catalog is hand-written YAML, so every mistake must come back as one line that names the
file, the model and the field and says what is allowed; unknown keys are errors because a typo
(`revison: v2`) that passes silently would ship the wrong weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelcar.errors import CatalogError, InputError
from modelcar.stores import CREDENTIALS_IN_NAME, has_credentials, registry_prefix_problem

MODEL_NAME_RE = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
HF_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
DIGEST_REF_RE = re.compile(r"^\S+@sha256:[0-9a-f]{64}$")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20~^:?*\[\\\x7f]")
# The Linux architectures Go (and so containerd, CRI-O and every registry client) knows: the
# OCI image index takes GOARCH names. Anything else is an image no node would pick.
ARCHITECTURES = (
    *("386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle"),
    *("ppc64", "ppc64le", "riscv64", "s390x"),
)
PLATFORM_RE = re.compile(r"^linux/([a-z0-9_]+)(/v[0-9]+)?$")
# The variant an architecture has when none is named (containerd's platform rules): `linux/arm64/v8`
# and `linux/arm64` are one platform, written the short way.
DEFAULT_VARIANTS = {"arm64": "/v8", "amd64": "/v1"}

DEFAULT_BRANCH = "main"
ALWAYS_EXCLUDED = (".git/*", ".cache/*", ".gitattributes")

T = TypeVar("T")


def select_files(items: Iterable[T], include: list[str], exclude: list[str], key: Callable[[T], str]) -> list[T]:
    """The items whose repo path `include` matches and `exclude` does not.

    Matching is huggingface_hub's own (`allow_patterns`/`ignore_patterns` of snapshot_download),
    so a catalog's patterns mean what Hub users already know; git and cache metadata never ship.
    """
    from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]

    chosen = filter_repo_objects(items, allow_patterns=include, ignore_patterns=[*exclude, *ALWAYS_EXCLUDED], key=key)
    return sorted(chosen, key=key)


def check_revision(value: str) -> str:
    """A git branch, tag or commit, by git's own ref-name rules (git check-ref-format)."""
    if COMMIT_RE.fullmatch(value):
        return value
    bad = (
        not value
        or _BAD_REF_CHARS.search(value)
        or ".." in value
        or "@{" in value
        or "//" in value
        or value.startswith(("/", "-", "."))
        or value.endswith(("/", ".", ".lock"))
        or value == "@"
    )
    if bad:
        raise ValueError(
            f"{value!r} is not a valid revision: use a branch or tag name (e.g. main, v1.0) or a 40-hex commit"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Kubernetes names, as the API server takes them. They go into kustomization.yaml entries and patch
# file names: anything else (a newline, a slash) could write YAML or a file the patch never meant to.
K8S_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}$")
K8S_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)  # DNS-1123 subdomain
K8S_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # DNS-1123 label: a container's name


class Target(_Strict):
    kind: str
    name: str

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if not K8S_KIND.fullmatch(v):
            raise ValueError(f"{v!r} is not a Kubernetes kind (Deployment, StatefulSet, InferenceService...)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not K8S_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a Kubernetes object name: lowercase letters, digits, '-' and '.'")
        return v


class Drop(_Strict):
    initContainers: list[str] = Field(default_factory=list)
    volumes: list[str] = Field(default_factory=list)


class Overlay(_Strict):
    path: str
    target: Target
    container: str = "vllm"
    mode: Literal["image-volume", "kserve", "init-copy"] = "image-volume"
    drop: Drop | None = None
    subPath: bool = False
    args: list[str] | None = None  # the container's full args, for bases modelcar cannot read

    @field_validator("container")
    @classmethod
    def _container(cls, v: str) -> str:
        if not K8S_LABEL.fullmatch(v):
            raise ValueError(f"{v!r} is not a container name: lowercase letters, digits and '-', 63 at most")
        return v


class _ModelKeys(_Strict):
    """Keys a model may take and `defaults` may set for every model."""

    revision: str | None = None
    servedName: str | None = None
    tags: list[str] = Field(default_factory=list)
    base: str | None = None
    platforms: list[str] | None = None  # linux/amd64 and linux/arm64 without a base, the base's with one
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    overlays: list[Overlay] = Field(default_factory=list)

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        return None if v is None else check_revision(v)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not TAG_RE.fullmatch(tag):
                raise ValueError(f"{tag!r} is not a valid OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        if v is not None and has_credentials(v):  # and never repeated in a message
            raise ValueError(CREDENTIALS_IN_NAME)
        if v is not None and not DIGEST_REF_RE.fullmatch(v):
            raise ValueError(f"{v!r} must be pinned by digest: REPOSITORY@sha256:<64 hex>")
        return v

    @field_validator("platforms")
    @classmethod
    def _platforms(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("name at least one platform, or leave the key out for the default")
        named = []
        for platform in v:
            match = PLATFORM_RE.fullmatch(platform)
            if not match:
                raise ValueError(f"{platform!r} is not a platform: linux/ARCH or linux/ARCH/VARIANT, e.g. linux/s390x")
            arch, variant = match.group(1), match.group(2)
            if arch not in ARCHITECTURES:
                raise ValueError(
                    f"{platform!r}: {arch!r} is no architecture a node reports (Go's names: {', '.join(ARCHITECTURES)})"
                )
            named.append(
                platform.removesuffix(variant) if variant and DEFAULT_VARIANTS.get(arch) == variant else platform
            )
        if len(set(named)) != len(named):
            raise ValueError(f"{v} names a platform twice")
        return sorted(named)  # the index lists them in this order: the catalog's order must not change the digest

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern or pattern.startswith("/"):
                raise ValueError(f"{pattern!r} is not a valid pattern: use globs relative to the repo root")
        return v


class Defaults(_ModelKeys):
    pass


class ModelSpec(_ModelKeys):
    name: str
    hf: str | None = None
    path: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not MODEL_NAME_RE.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid model name: lowercase letters and digits, separated by "
                "'.', '_', '__' or dashes ([a-z0-9]+((.|_|__|-+)[a-z0-9]+)*); it becomes an OCI repository name"
            )
        return v

    @field_validator("hf")
    @classmethod
    def _hf(cls, v: str | None) -> str | None:
        if v is not None and not HF_REPO_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a Hugging Face repo id: use ORG/NAME, e.g. Qwen/Qwen2.5-0.5B-Instruct")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.hf is None) == (self.path is None):
            raise ValueError("set exactly one of 'hf' (a Hub repo id) or 'path' (a local directory)")
        if self.path is not None and self.revision is not None:
            raise ValueError("'revision' applies to 'hf' models only; a 'path' model is pinned by its content")
        return self

    @property
    def served_name(self) -> str:
        return self.servedName or self.name

    @property
    def hf_revision(self) -> str:
        return self.revision or DEFAULT_BRANCH


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: Path
    registry: str | None
    models: list[ModelSpec]

    @property
    def root(self) -> Path:
        return self.file.parent

    @property
    def lock_file(self) -> Path:
        return self.file.with_suffix(".lock")

    @property
    def default_layout(self) -> Path:
        """Where `build` writes images without `--push` or `--layout`, and other commands read them."""
        return self.root / ".modelcar" / "oci"

    def label(self, spec: ModelSpec) -> str:
        """How errors name a model: the file, its index and its name (`catalog.yaml: models[2] (qwen)`)."""
        index = next(i for i, m in enumerate(self.models) if m.name == spec.name)
        return f"{self.file}: models[{index}] ({spec.name})"

    def registry_prefix(self, override: str | None = None) -> str:
        """Where images are pushed: `override` (--registry), else the catalog's `registry:`."""
        prefix = override or self.registry
        if not prefix:
            raise InputError(
                f"{self.file}: no registry: pass --registry HOST[:PORT]/PATH or set `registry:` in the catalog"
            )
        return prefix

    def select(self, names: list[str] | None) -> list[ModelSpec]:
        """The models named on the command line, in catalog order; all when none are named."""
        if not names:
            return list(self.models)
        known = {m.name for m in self.models}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CatalogError(
                f"{self.file}: no model named {', '.join(map(repr, unknown))}; "
                f"the catalog has: {', '.join(sorted(known))}"
            )
        wanted = set(names)
        return [m for m in self.models if m.name in wanted]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: YAML keeps the last one silently, hiding a typo."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _describe(err: Any, allowed: list[str]) -> str:
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind == "list_type":  # `tags: stable` for `tags: [stable]`
        return f"{loc}: expected a list, e.g. `{err['loc'][-1]}: [{err.get('input')}]`"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc` inside `model`, to name them when an unknown key is found."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            for inner in (candidate, *getattr(candidate, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    cls = inner
                    break
    return sorted(cls.model_fields)


def _format(errors: ValidationError, model: type[BaseModel]) -> list[str]:
    return [_describe(e, _allowed_keys(model, tuple(e["loc"]))) for e in errors.errors()]


def yaml_problem(file: Path, exc: yaml.YAMLError | UnicodeDecodeError) -> str:
    """A YAML file that does not parse, in one line: `FILE:LINE:COL: YAML syntax error: what`."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        return f"{where}: YAML syntax error: {exc.problem or exc.context}"
    return f"{file}: cannot parse YAML: {' '.join(str(exc).split())}"


def load_catalog(path: Path | str) -> Catalog:
    """Read and validate a catalog file; raise CatalogError (exit 2) with every problem found."""
    file = Path(path)
    if file.is_dir():
        raise CatalogError(f"{file}: a directory, not a catalog file (pass -c/--catalog DIR/catalog.yaml)")
    if not file.is_file():
        raise CatalogError(f"{file}: catalog file not found (pass -c/--catalog PATH)")
    try:
        raw = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CatalogError(yaml_problem(file, exc)) from None

    if not isinstance(raw, dict):
        raise CatalogError(f"{file}: the catalog must be a mapping with a 'models' list")
    problems: list[str] = []
    top_allowed = ["defaults", "models", "registry"]
    for key in raw:
        if key not in top_allowed:
            problems.append(f"{key}: unknown key; allowed keys here: {', '.join(top_allowed)}")

    registry = raw.get("registry")
    if registry is not None and (problem := registry_prefix_problem(str(registry))) is not None:
        problems.append(f"registry: {problem}")

    raw_defaults = raw.get("defaults") or {}
    defaults: dict[str, Any] = {}
    if not isinstance(raw_defaults, dict):
        problems.append("defaults: must be a mapping of model keys")
    else:
        try:
            Defaults.model_validate(raw_defaults)
            defaults = raw_defaults
        except ValidationError as exc:
            problems += [f"defaults.{p}" for p in _format(exc, Defaults)]

    raw_models = raw.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        problems.append("models: required, a non-empty list of models")
        raw_models = []

    indexed: list[tuple[int, ModelSpec]] = []
    for index, entry in enumerate(raw_models):
        label = f"models[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{label}: each model must be a mapping with 'name' and 'hf' or 'path'")
            continue
        if isinstance(entry.get("name"), str):
            label += f" ({entry['name']})"
        merged = {**defaults, **entry}
        if "path" in entry and "revision" not in entry:
            merged.pop("revision", None)  # a default branch does not apply to a local directory
        try:
            indexed.append((index, ModelSpec.model_validate(merged)))
        except ValidationError as exc:
            problems += [f"{label}: {p}" for p in _format(exc, ModelSpec)]

    seen: dict[str, int] = {}
    for index, spec in indexed:
        if spec.name in seen:
            problems.append(f"models[{index}] ({spec.name}): name: duplicate; models[{seen[spec.name]}] has it too")
        seen.setdefault(spec.name, index)

    if problems:
        raise CatalogError("\n".join(f"{file}: {p}" for p in problems))
    return Catalog(file=file, registry=registry, models=[spec for _, spec in indexed])
