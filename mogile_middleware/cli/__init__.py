"""The ``mogile-middleware`` command line: its parser, the commands, the demo and their helpers."""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
