"""The `modelcar` entry point itself, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from modelcar import __version__


def test_main_leaves_what_is_alive_at_exit_to_the_os() -> None:
    """main() freezes the cyclic GC on the way out, also when the command exits through SystemExit:
    the interpreter's exit then skips traversing every object the imports made."""
    code = (
        "import atexit, gc, sys; sys.argv = ['modelcar', '--version']; "
        "atexit.register(lambda: print('frozen', gc.get_freeze_count())); "
        "from modelcar.cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version, frozen = done.stdout.splitlines()
    assert version == f"modelcar {__version__}"
    assert frozen.split()[0] == "frozen" and int(frozen.split()[1]) > 10_000  # typer, pydantic, the catalog models


def test_main_freezes_what_the_imports_made_before_the_command_runs() -> None:
    code = (
        "import gc, sys; import modelcar.cli as cli; "
        "cli.app = lambda: print('frozen', gc.get_freeze_count()); cli.main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    label, count = done.stdout.split()
    assert label == "frozen" and int(count) > 10_000
