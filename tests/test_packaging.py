"""What the package declares about itself holds: its dependency floors are the ones CI tests."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_oldest_releases_ci_installs_are_the_declared_lower_bounds() -> None:
    """scripts/test.sh runs tests with scripts/min-deps.txt: a floor raised in pyproject.toml and
    not there (or the other way round) would test releases users cannot get, or miss ones they can."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    # on the oldest Python (where CI installs them); a marker raises a floor where older releases have no wheels
    floors = {
        _name(r): Version(m.group(1)) for r in declared if ";" not in r and (m := re.search(r">=\s*([^,;\s]+)", r))
    }
    pins = {}
    for line in (REPO / "scripts" / "min-deps.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            pins[_name(name)] = Version(version.strip())
    assert {name: pins.get(name) for name in floors} == floors
    assert set(floors) == {_name(r) for r in declared}  # every dependency has a floor
    # huggingface_hub 1.x wants typer-slim, which up to 0.21 ships a typer/ of its own: the same
    # release as typer's, or the two overwrite each other's files
    assert pins["typer-slim"] == pins["typer"]
