"""Command line: a thin layer over :mod:`dkvb.experiment` and :mod:`dkvb.service`. ``main(argv)`` is
testable.

The package: :mod:`.common` (the command registry and shared arguments), :mod:`.experiments`
(embed, train, evaluate, unlearn, run), :mod:`.serving` (forget, restore, log, prune) and
:mod:`.checks` (replay, verify); each command module registers its commands on import.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..threads import set_threads
from . import experiments, serving, checks  # noqa: F401,I001  (register their commands, in this order)
from .common import COMMANDS, shown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dkvb", description="Low-compute class unlearning with discrete "
                                     "key-value bottlenecks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details; show tracebacks")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch/faiss (default: $DKVB_THREADS, else the cores free to this "
                             "process: its affinity mask minus the current load)")
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command too, without overriding one before
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress details; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, parents=[verbose])
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        set_threads(args.threads)
        return args.func(args)
    except Exception as e:  # one line naming the file or field; the traceback with -v
        if args.verbose:
            raise
        expected = isinstance(e, (ValueError, OSError, TypeError, RuntimeError))
        text = " ".join(str(e).split()) if expected else f"{type(e).__name__}: {e} (run with -v for the traceback)"
        print(f"dkvb {args.command}: error: {shown(text)}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
