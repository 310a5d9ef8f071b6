"""`python -m kproxyd` runs the command line."""

from kproxyd.cli import main

main()
