"""Regenerate the synthetic sample catalog (images, spec, labeled/catalog/ground-truth parquets).

Usage: python sample_data/generate.py [--out DIR] [--seed N] [--labeled N] [--catalog N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipdq.sample_data import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labeled", type=int, default=2400, help="number of clean labeled products")
    parser.add_argument("--catalog", type=int, default=320, help="number of catalog products to audit")
    args = parser.parse_args(argv)
    print(generate(args.out, seed=args.seed, n_labeled=args.labeled, n_catalog=args.catalog))


if __name__ == "__main__":
    main()
