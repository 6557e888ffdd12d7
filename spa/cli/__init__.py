"""The command line: argument parsing and printing around one spa.api call per command."""

from spa.cli.app import entry, main

__all__ = ["entry", "main"]
