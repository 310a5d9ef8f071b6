"""Command line: placeholder until the daemon is wired."""


def main() -> None:
    """Entry point."""
