"""The representative selection passes on a second kernel: Debian's stock 6.1 booted under qemu TCG (slow)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.guest.run import REPRESENTATIVE, run_pytest

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.timeout(3600)]


@pytest.mark.skipif(os.environ.get("KPROXYD_GUEST") == "1", reason="already inside the guest")
@pytest.mark.skipif(os.geteuid() != 0, reason="the guest's lab needs root (CI runs as root)")
def test_representative_selection_passes_on_debian_6_1() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: `make setup` installs qemu-system-x86")
    result = run_pytest(REPRESENTATIVE, echo=False)
    if result.returncode is None and "guest: kernel" not in result.output:
        pytest.skip(f"qemu could not boot the 6.1 guest on this machine: {result.output[-500:]}")
    assert result.returncode == 0, result.output[-6000:]
