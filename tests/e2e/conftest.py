"""Shared by the stack tests: one demo-teacher cache for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """The ``demo.cache_dir`` of every stack brought up in this session: the demo teacher (about
    3 minutes of training on a busy 2-core machine) is trained by the first run that needs it, under
    its lock, and found by the others (it is keyed by its config's hash)."""
    return tmp_path_factory.mktemp("demo-cache")
