"""Command line: ``scinfl demo``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scinfl", description="Key-embedded federated learning for omics.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train centralised, per-site, FedAvg and INFL models on real PBMCs and compare them",
        description="Real data (scanpy's pbmc68k_reduced), 3 label-skewed sites, a 20%% held-out test set.",
    )
    demo.add_argument("--rounds", type=int, default=20, help="federated rounds (default 20)")
    demo.add_argument("--seeds", type=int, default=3, help="training seeds to average over (default 3)")
    demo.add_argument("--wrong-keys", type=int, default=10, help="wrong keys per seed (default 10)")
    demo.add_argument("--hidden", type=int, default=256, help="network width (default 256)")
    demo.add_argument("--output-dir", default=".", help="where to write scinfl_demo.h5ad and the PNG")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            rounds=args.rounds,
            seeds=args.seeds,
            n_wrong_keys=args.wrong_keys,
            hidden=args.hidden,
            output_dir=args.output_dir,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
