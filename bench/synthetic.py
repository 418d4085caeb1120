#!/usr/bin/env python3
"""Synthetic BIMBAM data of BXD's layout at any size, and a scale run through sheepdog.

    python3 bench/synthetic.py --individuals 2000 --snps 100000 --out /tmp/synth [--run]

Writes geno (gzipped), pheno, anno. With --run, times `sheepdog run gemma-loco` on it and
reports wall time and the peak memory of the coordinator (validation and splitting
stream the genotype file; it is never held whole) and of the whole job.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(individuals: int, snps: int, chromosomes: int, out: Path, seed: int = 1) -> None:
    """Founder haplotype blocks, like recombinant inbred strains: realistic LD."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    per_chrom = snps // chromosomes
    with gzip.open(out / "geno.txt.gz", "wt", compresslevel=1) as geno, \
            open(out / "anno.txt", "w") as anno:
        for c in range(1, chromosomes + 1):
            n = per_chrom + (snps % chromosomes if c == chromosomes else 0)
            state = rng.integers(0, 2, size=individuals).astype(np.int8)
            for j in range(n):
                flip = rng.random(individuals) < 0.02  # a recombination now and then
                state = np.where(flip, 1 - state, state)
                values = state * 2.0
                if rng.random() < 0.05:  # a few het / missing calls
                    values = values.astype(object)
                    values[rng.integers(0, individuals)] = "NA"
                rs = f"snp{c}_{j}"
                geno.write(f"{rs}, A, B, " + ", ".join(map(str, values)) + "\n")
                anno.write(f"{rs}\t{1_000_000 + j * 1000}\t{c}\n")
    effect = rng.normal(size=individuals)
    pheno = [("NA" if rng.random() < 0.1 else f"{v:.4f}") for v in effect]
    (out / "pheno.txt").write_text("\n".join(pheno) + "\n")


def peak_rss_mb(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(seconds, peak RSS in MB of the process itself, of the largest process it ran).

    The first is the process's own high-water mark (VmHWM, read while it runs), so a
    GEMMA child's memory does not count as the coordinator's."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    own = 0.0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            own = max(own, int(status.split("VmHWM:")[1].split()[0]) / 1024)
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{argv[:4]} failed with exit code {proc.returncode}")
    seconds = time.perf_counter() - start
    return seconds, own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--individuals", type=int, default=2000)
    parser.add_argument("--snps", type=int, default=100_000)
    parser.add_argument("--chromosomes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder (default: a new one under bench/out/, git-ignored)")
    parser.add_argument("--run", action="store_true", help="also run gemma-loco on it")
    args = parser.parse_args()
    if args.out is None:
        out = Path(__file__).resolve().parent / "out"
        out.mkdir(exist_ok=True)
        args.out = Path(tempfile.mkdtemp(prefix="synth-", dir=out))
    start = time.perf_counter()
    generate(args.individuals, args.snps, args.chromosomes, args.out)
    size = (args.out / "geno.txt.gz").stat().st_size / 1e6
    print(f"generated {args.individuals} x {args.snps} in {time.perf_counter() - start:.1f} s "
          f"({size:.0f} MB gzipped) in {args.out}")
    if not args.run:
        return
    env = dict(os.environ, SHEEPDOG_HOME=str(args.out / "home"))
    env.pop("SHEEPDOG_REDIS_URL", None)
    inputs = ["-g", str(args.out / "geno.txt.gz"), "-p", str(args.out / "pheno.txt"),
              "-a", str(args.out / "anno.txt")]
    sd = [sys.executable, "-m", "sheepdog"]
    subprocess.run([*sd, "run", "--", "true"], env=env, check=True, stdout=subprocess.DEVNULL)
    # the coordinator's part alone, in a fresh process: validation and split
    probe = ("import sys; from pathlib import Path; from sheepdog.cache import Cache; "
             "from sheepdog.gemma.workflows import GemmaRequest, prepare; "
             "o = Path(sys.argv[1]); prepare(GemmaRequest(geno=o / 'geno.txt.gz', "
             "pheno=o / 'pheno.txt', anno=o / 'anno.txt'), Cache(o / 'probe-store'))")
    seconds, coordinator_mb, _ = peak_rss_mb([sys.executable, "-c", probe, str(args.out)], env)
    print(f"coordinator (validate + split): {seconds:.1f} s, peak {coordinator_mb:.0f} MB"
          f" (the genotype matrix alone would be "
          f"{args.individuals * args.snps * 8 / 1e6:.0f} MB as doubles)")
    seconds, own_mb, largest_mb = peak_rss_mb([*sd, "run", "gemma-loco", *inputs, "--out",
                                               str(args.out / "result")], env)
    print(f"whole LOCO scan: {seconds:.1f} s; peak {own_mb:.0f} MB in the sheepdog process "
          f"(it runs the kinship, LOCO and gather steps); the largest single process of the "
          f"run (sheepdog or a GEMMA) peaked at {largest_mb:.0f} MB")
    subprocess.run([*sd, "redis", "stop"], env=env, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
