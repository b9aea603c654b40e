"""scripts/setup.sh, the first half of both README commands: with and without --test it must get to
"ready" and exit 0 (without --test it once exited 1 before installing anything, so the README's
daemon command never started the daemon on a fresh machine)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT


@pytest.mark.parametrize("args, stamp", [([], ".qcnode-installed"), (["--test"], ".qcnode-installed-test")])
def test_setup_script_reaches_ready(tmp_path: Path, args: list[str], stamp: str):
    """A copy of the project's set-up files with an up-to-date .venv (its python runs this one's,
    its stamp matches pyproject.toml), so the script runs its whole path without installing."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(PROJECT_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    digest = hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()).hexdigest()
    (tmp_path / ".venv" / stamp).write_text(digest + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *args], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[setup] ready: qcnode" in res.stdout
    assert "installing qcnode" not in res.stdout  # the stamp was current: nothing re-installed
