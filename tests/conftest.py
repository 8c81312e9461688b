"""Shared fixtures: the test guests, built from tests/guests with binutils."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_SRC = ROOT / "tests" / "guests"
GUEST_OUT = ROOT / "build" / "guests"


@pytest.fixture(scope="session")
def guests() -> Path:
    """Directory holding the built test guests (longmode.elf, smp.elf, i386.elf …)."""
    subprocess.run(
        ["make", "-s", "-C", str(GUEST_SRC), f"OUT={GUEST_OUT}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return GUEST_OUT
