"""Entry point for ``python -m dicomfs``; it only hands over to the CLI."""

from dicomfs.cli import entry

entry()
