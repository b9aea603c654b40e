"""Shared pytest fixtures. Area-specific fixtures live next to their tests."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_CT = PROJECT_ROOT.parent / "shared" / "data" / "ct"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """``../shared/data/ct`` (real CT series: ge_head, philips_head_phantom)."""
    if not SHARED_CT.is_dir():
        pytest.fail(f"shared CT data missing at {SHARED_CT}")
    return SHARED_CT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
