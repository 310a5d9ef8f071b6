"""`kproxyd lab demo` (what `make demo` runs) completes and shows the tutorials' behaviour."""

from __future__ import annotations

import io

from kproxyd.lab.demo import run_demo


def test_demo_replays_the_tutorials() -> None:
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    assert "backend-0" in text and "backend-1" in text and "backend-2" in text
    assert "connection refused" in text
    assert "saw source 172.28.0.200: the client's own address" in text
    assert '"default/backend-service:http cluster IP"' in text
    assert text.rstrip().endswith("between network namespaces.")
