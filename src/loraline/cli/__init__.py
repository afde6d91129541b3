"""`loraline` command line: parsing and printing only; every command calls one library function."""

from loraline.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
