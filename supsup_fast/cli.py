"""The ``supsup-fast`` command: ``info`` (what is active) and ``run`` (a continual-learning experiment)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.render(data))
    if args.require_ext and not data["extension_loaded"]:
        print("error: the compiled extension supsup_fast._C is not loaded", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supsup-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="print versions, the compiled extension's state and the backend of every op")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.add_argument("--require-ext", action="store_true", help="exit 1 when the compiled extension is not loaded")
    pi.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)
