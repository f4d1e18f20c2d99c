"""Registry credentials, found where docker, podman and skopeo users already keep them.

Lookup order for a registry host: `REGISTRY_AUTH_FILE` (podman/skopeo), then the docker config
(`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), then podman's default
`$XDG_RUNTIME_DIR/containers/auth.json`. In each file a `credHelpers` entry for the host wins,
then `auths`, then the global `credsStore`. Secrets never leave this module in a printable form.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcar.errors import ModelcarError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = ""  # where they came from, for error messages: never the secret itself
    # from a credential helper, which may hand out a fresh secret when this one is refused (gcloud's
    # access token lives an hour, ECR's twelve: a long mirror outlives them)
    renewable: bool = False

    @property
    def is_identity_token(self) -> bool:
        return self.username == "<token>"

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _config_files() -> list[Path]:
    """Where `docker login`, `podman login` and `buildah login` leave credentials, first match wins.

    Podman's own file is `$XDG_RUNTIME_DIR/containers/auth.json`, or `/run/containers/UID/auth.json`
    where that variable is unset (root in a CI container); it also reads
    `$XDG_CONFIG_HOME/containers/auth.json` (containers-auth.json(5)).
    """
    files = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env))
    expanded = os.path.expanduser("~")
    home = None if expanded == "~" else expanded  # a random UID without HOME nor passwd entry has none
    if os.environ.get("DOCKER_CONFIG"):
        files.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    elif home:
        files.append(Path(home) / ".docker" / "config.json")
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime) / "containers" / "auth.json")
    elif hasattr(os, "getuid"):
        files.append(Path("/run/containers") / str(os.getuid()) / "auth.json")
    if config_home := os.environ.get("XDG_CONFIG_HOME") or (home and os.path.join(home, ".config")):
        files.append(Path(config_home) / "containers" / "auth.json")
    return files


DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def _normalize(key: str, keep_path: bool = False) -> str:
    """`https://host/v1/`, `http://host`, `host/` -> `host`, so any spelling of a host matches;
    Docker Hub's names (`docker login` writes `https://index.docker.io/v1/`) become `docker.io`.
    With `keep_path`, a namespace after the host stays (`quay.io/team-a`: podman's auth files
    may hold one entry per namespace) in a key written without a scheme; a URL's path
    (`https://host/v2/`) is an API path, dropped, as docker and containers/image do."""
    bare = key
    for scheme in ("https://", "http://"):
        bare = bare.removeprefix(scheme)
    host, _, path = bare.partition("/")
    path = path.strip("/") if bare == key else ""
    if host in DOCKER_HUB_NAMES:
        host, path = "docker.io", "" if path == "v1" else path  # `index.docker.io/v1/`, docker's old key
    return f"{host}/{path}" if keep_path and path else host


def _most_specific(auths: dict[str, Any], host: str, path: str) -> Any:
    """The `auths` entry for the longest key that is `host`, or `host` and a leading part of
    `path` (podman and skopeo: `quay.io/team-a` wins over `quay.io` for `quay.io/team-a/x`)."""
    parts = path.split("/") if path else []
    for i in range(len(parts), -1, -1):  # the whole path first, the bare host last
        if (name := "/".join([host, *parts[:i]])) in auths:
            return auths[name]
    return None


def _helper(name: str, host: str, source: str) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run([program, "get"], input=host, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ModelcarError(f"{source}: credential helper {program} is not installed (needed for {host})") from None
    except subprocess.TimeoutExpired:
        raise ModelcarError(f"{source}: credential helper {program} did not answer for {host}") from None
    if proc.returncode != 0:
        return None  # helpers exit non-zero for "credentials not found in native keychain"
    try:
        data = json.loads(proc.stdout)
        return Credentials(data["Username"], data["Secret"], f"{program}", renewable=True)
    except (ValueError, KeyError, TypeError):
        raise ModelcarError(f"{source}: credential helper {program} gave an unreadable answer for {host}") from None


def _from_auth_entry(entry: dict[str, Any], source: str) -> Credentials | None:
    if token := entry.get("identitytoken"):
        return Credentials("<token>", str(token), source)
    if auth := entry.get("auth"):
        try:
            user, colon, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            colon = ""
        if not colon:  # not user:password (the whole secret would be taken, and shown, as the user)
            raise ModelcarError(f"{source}: the 'auth' entry is not base64 of user:password")
        return Credentials(user, password, source)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]), source)
    return None


def find_credentials(host: str, path: str = "", auth_file: Path | None = None) -> Credentials | None:
    """Credentials for repositories under `host` (HOST[:PORT]) and `path` from the usual config
    files, or None for anonymous. With `auth_file` (a service's, per tenant), only that file's
    `auths` entries: not the process's files, and no credential helper it names (a helper answers
    from this machine's keychain or cloud identity, the service's own, not the tenant's)."""
    host = _normalize(host)
    path = path.strip("/")
    if auth_file is not None and not auth_file.is_file():
        what = "is a directory, not an auth file" if auth_file.is_dir() else "registry auth file not found"
        raise ModelcarError(f"{auth_file}: {what}")
    for file in [auth_file] if auth_file is not None else _config_files():
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelcarError(f"{file}: cannot read registry credentials ({type(exc).__name__})") from None
        if auth_file is not None:  # no helper runs for it
            config = {"auths": config.get("auths")}
        helpers = {_normalize(k): v for k, v in (config.get("credHelpers") or {}).items()}
        # helpers know Docker Hub by the URL `docker login` uses
        helper_key = "https://index.docker.io/v1/" if host == "docker.io" else host
        if host in helpers:
            return _helper(helpers[host], helper_key, str(file))
        auths = {_normalize(k, keep_path=True): v for k, v in (config.get("auths") or {}).items()}
        entry = _most_specific(auths, host, path)
        if entry is not None and (creds := _from_auth_entry(entry, str(file))):
            return creds
        if store := config.get("credsStore"):
            creds = _helper(store, helper_key, str(file))
            if creds is not None:
                return creds
    return None
