"""``python -m analysis uuid --runs results/runs --out reports/uuid``: Fig. 2, Fig. 3 and Table 2.

Reads run folders only; exits 1 with a message when no run matches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from analysis.runs import load_runs
from analysis.uuid_figures import write_uuid_report


def _filter(text: str) -> tuple[str, object]:
    """``train.max_steps=300`` → ("train.max_steps", 300); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="report", required=True)
    uuid = sub.add_parser("uuid", help="UUID memorisation: fig2.{png,pdf}, fig3.{png,pdf}, table2.md")
    uuid.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    uuid.add_argument("--out", type=Path, default=Path("reports/uuid"), help="output folder (default: %(default)s)")
    uuid.add_argument("--scale", default=None, help="mini | paper (default: the one scale present)")
    uuid.add_argument("--where", type=_filter, action="append", default=[], metavar="KEY=VALUE",
                      help="keep runs whose config has this dotted key's value, e.g. train.max_steps=300")
    return parser.parse_args(argv)


def uuid_report(args: argparse.Namespace) -> int:
    """Load the runs, write the report, print what was written; 1 if there is nothing to report."""
    start = time.perf_counter()
    if not args.runs.is_dir():
        print(f"error: no runs: {args.runs} is not a folder; run experiments/run.py first", file=sys.stderr)
        return 1
    try:
        runs = load_runs(args.runs, task="uuid", scale=args.scale, **dict(args.where))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not runs:
        print(f"error: no UUID run folders found under {args.runs} (scale={args.scale or 'any'}, "
              f"filters={dict(args.where) or 'none'}); run experiments/run.py first", file=sys.stderr)
        return 1
    written, skipped = write_uuid_report(runs, args.out)
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(runs)} runs in {time.perf_counter() - start:.1f} s")
    return 0 if written else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"uuid": uuid_report}[args.report](args)


if __name__ == "__main__":
    raise SystemExit(main())
