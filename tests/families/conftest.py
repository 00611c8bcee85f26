"""Fixtures of the family tests: the tiny SDXL pipeline of the online golden data."""

from __future__ import annotations

from pathlib import Path

import pytest

ONLINE = Path(__file__).parent.parent / "data" / "online"
SDXL = ONLINE / "sdxl-pipeline"
CASES = ONLINE / "cases"


@pytest.fixture(scope="session")
def sdxl_pipe():
    from ovstore.capture import load_pipeline

    return load_pipeline(str(SDXL))
