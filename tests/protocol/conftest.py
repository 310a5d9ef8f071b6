"""Fixtures for protocol tests: the lab API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kproxyd.lab.apiserver import LabApiServer


@pytest.fixture
def server() -> Iterator[LabApiServer]:
    """A lab API server (bookmarks every 0.2 s), stopped afterwards."""
    srv = LabApiServer(bookmark_interval=0.2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
