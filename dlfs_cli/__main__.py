"""`python -m dlfs_cli` is `dlfs`."""

from dlfs_cli.cli import main

main()
