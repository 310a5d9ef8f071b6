"""A scratch network namespace for tests that program a kernel (root only); never the root namespace."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def scratch_netns() -> Iterator[str]:
    """A fresh, empty network namespace (its name), deleted afterwards."""
    name = f"kpt-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
