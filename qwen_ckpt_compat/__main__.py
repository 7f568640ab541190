"""Command line: ``python -m qwen_ckpt_compat demo`` and ``... doctor [MODEL]`` (or ``qwen-ckpt-compat ...``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-ckpt-compat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="show the problem and the fix on the tiny Qwen v1 model (offline, CPU)")
    demo.add_argument("--steps", type=int, default=5, help="LoRA training steps (default 5)")
    demo.add_argument("--layers", type=int, default=2, help="decoder blocks of the tiny model (default 2)")
    demo.add_argument("--seq-length", type=int, default=64, help="tokens per sequence (default 64)")
    doctor = commands.add_parser(
        "doctor",
        help="say what is wrong with this environment and a model, and what to do (reads files only; offline)",
        description="Checks the installed packages and, given MODEL, its config.json and remote code (read, never "
        "run; no weights loaded). Exit status: 0 nothing needs your action, 1 something does, 2 MODEL unreadable.",
    )
    doctor.add_argument("model", nargs="?", metavar="MODEL", help="model directory, or a Hub id in the local cache")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON (docs/doctor.md)")
    doctor.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the report: auto (on a terminal, unless NO_COLOR is set), always, never")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "doctor":
        from .doctor import run

        return run(args.model, as_json=args.json, colour=args.color)
    from ._demo import run_demo

    run_demo(steps=args.steps, layers=args.layers, seq_length=args.seq_length, out=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
