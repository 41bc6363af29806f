"""The ``graphlora dump`` command: its arguments, and what it prints.

:func:`add_dump_parser` registers the command on the top-level parser (``graphlora/cli.py``). The
command calls :func:`graphlora.dump.run.dump` with progress on stderr (none with ``--quiet``), prints
the summary and the list of files written on stdout, and exits 0. A :class:`GraphLoraError`
propagates to the top-level handler; any other failure prints one line naming it and where its
traceback was written (``error.txt``), and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphlora.dump.options import FORMATS
from graphlora.dump.progress import first_line
from graphlora.dump.run import dump
from graphlora.errors import GraphLoraError
from graphlora.trace_modes import TRACE_MODE_CHOICES


def _cmd_dump(args: argparse.Namespace) -> int:
    try:
        result = dump(
            args.model, args.policy, args.out, formats=args.format, after=args.after, only=args.only or None,
            verify=not args.no_verify, trace_mode=args.trace_mode,
            fuse={"auto": "auto", "on": True, "off": False}[args.fuse], progress=None if args.quiet else sys.stderr,
        )
    except GraphLoraError:
        raise
    except Exception as e:  # noqa: BLE001 - an unexpected failure: one clear line, the traceback in a file
        print(f"graphlora: error: dump of {args.model} failed: {type(e).__name__}: {first_line(e)}\n"
              f"  traceback: {Path(args.out) / 'error.txt'}", file=sys.stderr)
        return 1
    print(result.summary, end="")
    print(f"\nwrote {len(result.files)} files to {result.out_dir}:")
    for path in result.files:
        print(f"  {path.name}")
    return 0


def add_dump_parser(subparsers: "argparse._SubParsersAction", model_spec_help: str = "MODEL SPEC") -> None:
    """Register the ``graphlora dump`` command (``model_spec_help``: the command line's help for a MODEL SPEC)."""
    p = subparsers.add_parser(
        "dump", help="write the graph after every pass, a component map and an HTML report",
        description="Rewrite MODEL under a policy and write the graph at every stage (text + diffs), a map "
                    "of the model collapsed by component and layer (DOT/SVG, JSON) and a self-contained HTML "
                    "page. A config directory is built and traced on the meta device (no weights). "
                    "See docs/dump.md.",
    )
    p.add_argument("model", help=model_spec_help)
    p.add_argument("--policy", default=None,
                   help="policy file (YAML or TOML) or preset name; default: the default policy")
    p.add_argument("--out", default="graphlora-dump", help="output directory (default: ./graphlora-dump)")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated formats among {', '.join(FORMATS)} (default: all); "
                        "summary.txt is always written")
    p.add_argument("--after", default=None, metavar="PASS",
                   help="write the per-stage files of the stage after PASS only ('export' or a pass name)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="show only labelled nodes matching (and their LoRA nodes) in the stage files and "
                        "node tables; keys: component, role, layer (N or A-B), module (glob); "
                        "'|' separates alternatives, e.g. --only component=vision,layer=0-3")
    p.add_argument("--no-verify", action="store_true",
                   help="do not compare the rewritten program with the original model")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--trace-mode", default="auto", choices=TRACE_MODE_CHOICES,
                   help="how to trace (see docs/tracing.md); blocks dumps the analysis recording and one trace per "
                        "block class, regional one trace per region")
    p.add_argument("--fuse", default="auto", choices=("auto", "on", "off"),
                   help="fuse LoRA branches into graphlora::lora_linear: auto (where measured faster: nowhere yet), on, off")
    p.set_defaults(func=_cmd_dump)
