"""Command line: ``python -m qwen_ckpt_compat demo`` (or ``qwen-ckpt-compat demo``)."""

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
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .demo import run_demo

    run_demo(steps=args.steps, layers=args.layers, seq_length=args.seq_length, out=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
