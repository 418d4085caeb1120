#!/usr/bin/env python3
"""LOCO on BXD end to end through `sheepdog run gemma-loco`, against baselines measured
in the same run, printed as ratios (no timed tests: numbers depend on the machine).

    python3 bench/loco_bench.py [--repeat 3] [--permutations 1000]
    python3 bench/synthetic.py --run      (2,000 x 100,000 synthetic data: time and memory)

Baselines: GEMMA's own `-gk -loco c` then `-lmm 9 -loco c` for every chromosome
serially, and the same commands two at a time (what gemma-wrapper + GNU parallel does).
Targets on a 2-core machine: cold LOCO <= 0.25x serial, cached rerun < 1 s,
1,000 permutations <= 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # git-ignored: what a run leaves behind
OUT.mkdir(exist_ok=True)
BXD = ROOT / "sheepdog" / "examples" / "bxd"
GENO, PHENO, ANNO = BXD / "BXD_geno.txt.gz", BXD / "BXD_pheno.txt", BXD / "BXD_snps.txt"


def chromosomes() -> list[str]:
    seen: list[str] = []
    for line in ANNO.read_text().splitlines():
        c = line.split()[2]
        if c not in seen:
            seen.append(c)
    return seen


def gemma_loco_commands(work: Path, chrom: str) -> tuple[list[str], list[str]]:
    base = ["gemma", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO)]
    kin = base + ["-gk", "1", "-loco", chrom, "-o", f"k{chrom}"]
    lmm = base + ["-k", str(work / "output" / f"k{chrom}.cXX.txt"), "-lmm", "9", "-maf", "0.1",
                  "-loco", chrom, "-o", f"l{chrom}"]
    return kin, lmm


def run_quiet(argv: list[str], cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def gemma_baseline(parallel: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        commands = [gemma_loco_commands(work, c) for c in chromosomes()]
        start = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda kl: run_quiet(kl[0], work), commands))
            list(pool.map(lambda kl: run_quiet(kl[1], work), commands))
        return time.perf_counter() - start


def sheepdog_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SHEEPDOG_REDIS_URL"}
    env["SHEEPDOG_HOME"] = str(home)
    return env


def sheepdog(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sheepdog", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def loco_args(out: Path) -> list[str]:
    return ["run", "gemma-loco", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO),
            "--out", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--permutations", type=int, default=0,
                        help="also time this many LOCO permutations (1000 for the target)")
    args = parser.parse_args()
    if not shutil.which("gemma"):
        sys.exit("gemma is not installed (apt-get install gemma)")
    home = Path(tempfile.mkdtemp(prefix="sheepdog-bench-", dir=OUT))
    env = sheepdog_env(home)
    sheepdog(["run", "--", "true"], env)  # start the embedded Redis outside the timings
    serial = statistics.median(gemma_baseline(1) for _ in range(args.repeat))
    pair = statistics.median(gemma_baseline(2) for _ in range(args.repeat))
    cold, cached = [], []
    for _ in range(args.repeat):
        shutil.rmtree(home / "store", ignore_errors=True)
        cold.append(sheepdog(loco_args(home / "out"), env))
        cached.append(sheepdog(loco_args(home / "out"), env))
    cold_s, cached_s = statistics.median(cold), statistics.median(cached)
    rows = {
        "gemma -loco serial (baseline)": serial,
        "gemma -loco 2 at a time": pair,
        "sheepdog gemma-loco cold": cold_s,
        "sheepdog gemma-loco cached rerun": cached_s,
    }
    print(f"BXD LOCO, {os.cpu_count()} cores, median of {args.repeat}")
    for name, seconds in rows.items():
        print(f"  {name:<36} {seconds:7.2f} s   {seconds / serial:5.3f}x serial")
    print(f"  target cold <= 0.25x serial: {'met' if cold_s <= 0.25 * serial else 'NOT met'}"
          f" ({cold_s / serial:.3f}x); cached < 1 s: {'met' if cached_s < 1 else 'NOT met'};"
          f" vs GEMMA 2 at a time: {pair / cold_s:.1f}x faster")
    if args.permutations:
        out = home / "perm"
        seconds = sheepdog(["run", "gemma-permute", "-g", str(GENO), "-p", str(PHENO), "-a",
                            str(ANNO), "--permutations", str(args.permutations), "--seed", "1",
                            "--out", str(out)], env)
        result = json.loads((out / "permutations.json").read_text())
        per = seconds / args.permutations
        print(f"  {args.permutations} permutations: {seconds:.1f} s ({per * 1000:.0f} ms each); "
              f"significant p {result['significant']:.3g}; target 1,000 in <= 300 s: "
              f"{'met' if per * 1000 <= 300 else 'NOT met'} (projected {per * 1000:.0f} s)")
    subprocess.run([sys.executable, "-m", "sheepdog", "redis", "stop"], env=env,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
