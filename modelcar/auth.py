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

    @property
    def is_identity_token(self) -> bool:
        return self.username == "<token>"

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _config_files() -> list[Path]:
    files = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env))
    docker_dir = Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG") else Path.home() / ".docker"
    files.append(docker_dir / "config.json")
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime) / "containers" / "auth.json")
    return files


DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def _normalize(key: str) -> str:
    """`https://host/v1/`, `http://host`, `host/` -> `host`, so any spelling of a host matches;
    Docker Hub's names (`docker login` writes `https://index.docker.io/v1/`) become `docker.io`."""
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    host = key.split("/", 1)[0]
    return "docker.io" if host in DOCKER_HUB_NAMES else host


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
        return Credentials(data["Username"], data["Secret"], f"{program}")
    except (ValueError, KeyError, TypeError):
        raise ModelcarError(f"{source}: credential helper {program} gave an unreadable answer for {host}") from None


def _from_auth_entry(entry: dict[str, Any], source: str) -> Credentials | None:
    if token := entry.get("identitytoken"):
        return Credentials("<token>", str(token), source)
    if auth := entry.get("auth"):
        try:
            user, _, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ModelcarError(f"{source}: the 'auth' entry is not base64 of user:password") from None
        return Credentials(user, password, source)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]), source)
    return None


def find_credentials(host: str) -> Credentials | None:
    """Credentials for `host` (HOST[:PORT]) from the usual config files, or None for anonymous."""
    host = _normalize(host)
    for path in _config_files():
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelcarError(f"{path}: cannot read registry credentials ({type(exc).__name__})") from None
        helpers = {_normalize(k): v for k, v in (config.get("credHelpers") or {}).items()}
        # helpers know Docker Hub by the URL `docker login` uses
        helper_key = "https://index.docker.io/v1/" if host == "docker.io" else host
        if host in helpers:
            return _helper(helpers[host], helper_key, str(path))
        auths = {_normalize(k): v for k, v in (config.get("auths") or {}).items()}
        if host in auths and (creds := _from_auth_entry(auths[host], str(path))):
            return creds
        if store := config.get("credsStore"):
            creds = _helper(store, helper_key, str(path))
            if creds is not None:
                return creds
    return None
