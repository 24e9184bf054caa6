"""``python -m mmsafe`` runs the CLI."""

from mmsafe.cli import main

main()
