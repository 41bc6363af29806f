"""Graph dumps (placeholder: the dump tool lands with the graph-dump issue)."""

from __future__ import annotations

import argparse


def add_dump_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Register the ``graphlora dump`` command."""
