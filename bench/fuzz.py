#!/usr/bin/env python3
"""The parser fuzzing of tests/test_fuzz.py, for longer: N random examples per parser.

    python3 bench/fuzz.py [--examples 20000] [--seed 1]

Prints, per parser, how many inputs were tried and that none gave anything but a result
or a clear error (a failure prints the smallest input that broke it, and exits 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_cases import (  # noqa: E402
    annotation_and_geno,
    covariates,
    geno_file,
    phenotypes,
    table_text,
    trait_table,
)
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CASES = {
    "BIMBAM genotypes + annotation": (annotation_and_geno, (table_text(), table_text())),
    "BIMBAM phenotypes": (phenotypes, (table_text(), st.integers(1, 5), st.integers(1, 3))),
    "BIMBAM covariates": (covariates, (table_text(), st.integers(1, 5))),
    "GN .geno": (geno_file, (table_text(),)),
    "trait tables (TSV/CSV, R/qtl2 pheno)": (trait_table, (table_text(),)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    failed = False
    for name, (prop, strategies) in CASES.items():
        start = time.perf_counter()
        test = seed(args.seed)(settings(max_examples=args.examples, deadline=None,
                                        database=None,
                                        suppress_health_check=list(HealthCheck))(
            given(*strategies)(prop)))
        try:
            test()
            verdict = "ok"
        except AssertionError as e:
            verdict, failed = f"FAILED: {e}", True
        except Exception as e:  # noqa: BLE001  the whole point: report what escaped
            verdict, failed = f"FAILED: {type(e).__name__}: {e}", True
        print(f"{name:<40} {args.examples:>7,d} inputs  {time.perf_counter() - start:6.1f} s"
              f"  {verdict}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
