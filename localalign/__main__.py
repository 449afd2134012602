"""`python -m localalign` runs the CLI."""

from localalign.cli import main

main()
