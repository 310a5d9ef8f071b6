"""structlog setup: human console lines by default, JSON for collectors; -v raises verbosity."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(verbosity: int = 0, json_format: bool = False) -> None:
    """Configure structlog and the stdlib root logger to write to stderr; verbosity < 0 shows warnings only."""
    level = logging.DEBUG if verbosity >= 4 else logging.INFO if verbosity >= 0 else logging.WARNING
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_format else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr per log call, not once: whoever swaps it (a test runner) is followed.
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
