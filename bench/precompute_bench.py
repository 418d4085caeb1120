#!/usr/bin/env python3
"""A precompute of 1,000 simulated BXD traits through `sheepdog run gemma-precompute`,
against serial GEMMA `-loco` per trait measured in the same run.

    python3 bench/precompute_bench.py [--traits 1000] [--serial 5] [--seed 7]

The traits: most carry a planted QTL at a known marker, all a polygenic background
drawn through the genome's kinship, and noise; seeded. Like GN's BXD datasets (an mRNA
dataset's thousands of traits are measured on one set of strains), every trait is
measured on the strains the bundled BXD phenotype has (67 of 198). The genotypes go in
as a GN .geno file.

Prints sheepdog's wall time and traits per minute, serial GEMMA's time per trait (the
per-chromosome `-gk 1 -loco c` and `-lmm 9 -loco c` GN's scripts run, on --serial
traits, extrapolated), the speed-up, the peak memory of the sheepdog processes, and the
share of planted QTLs whose top hit is within 5 Mb. Targets on 2 cores: 1,000 traits in
<= 5 minutes (>= 25x serial per trait), memory < 500 MB.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import gnformats  # noqa: E402

PLANTED_SHARE = 0.8
WINDOW_MB = 5.0


def simulate(folder: Path, count: int, seed: int) -> tuple[Path, dict[str, tuple[str, float]]]:
    """traits.tsv (ids as the .geno names them) and trait -> (chr, Mb) of its QTL."""
    rows, ann = gnformats.bimbam_rows(), gnformats.annotation()
    genotypes = np.array([[float(g) for g in r[3:]] for r in rows])
    measured = np.array([v != "NA" for v in (gnformats.EXAMPLE / "BXD_pheno.txt")
                         .read_text().split()])
    names = gnformats.ids(genotypes.shape[1])
    centred = genotypes - genotypes.mean(axis=1, keepdims=True)
    kinship = centred.T @ centred / len(rows)
    values, vectors = np.linalg.eigh(kinship)
    root = vectors * np.sqrt(np.clip(values, 0, None))
    rng = np.random.default_rng(seed)
    table = np.full((genotypes.shape[1], count), np.nan)
    planted = {}
    for t in range(count):
        background = root @ rng.normal(size=len(values))
        y = background / background.std() * 0.6 + rng.normal(size=len(values))
        if rng.random() < PLANTED_SHARE:
            marker = int(rng.integers(len(rows)))
            x = genotypes[marker] - genotypes[marker].mean()
            y += 2.5 * x / max(x.std(), 1e-9)
            pos, chrom = ann[rows[marker][0]]
            planted[f"trait{t + 1}"] = (chrom, int(pos) / 1e6)
        table[measured, t] = y[measured]
    path = folder / "traits.tsv"
    with open(path, "w") as f:
        f.write("id\t" + "\t".join(f"trait{t + 1}" for t in range(count)) + "\n")
        for name, row in zip(names, table, strict=True):
            f.write(name + "\t" + "\t".join("NA" if np.isnan(v) else f"{v:.6f}" for v in row)
                    + "\n")
    return path, planted


def serial_per_trait(folder: Path, traits: Path, how_many: int) -> float:
    """GEMMA's own LOCO for one trait: per chromosome -gk 1 -loco c, then -lmm 9."""
    geno, anno = gnformats.EXAMPLE / "BXD_geno.txt.gz", gnformats.EXAMPLE / "BXD_snps.txt"
    lines = traits.read_text().splitlines()
    chromosomes = list(dict.fromkeys(v[1] for v in gnformats.annotation().values()))
    work = folder / "serial"
    work.mkdir()
    took = []
    for column in range(1, how_many + 1):
        pheno = work / f"p{column}.txt"
        pheno.write_text("".join(line.split("\t")[column] + "\n" for line in lines[1:]))
        start = time.perf_counter()
        for c in chromosomes:
            base = ["gemma", "-g", str(geno), "-p", str(pheno), "-a", str(anno)]
            subprocess.run(base + ["-gk", "1", "-loco", c, "-o", f"k{c}"], cwd=work, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(base + ["-k", str(work / "output" / f"k{c}.cXX.txt"), "-lmm", "9",
                                   "-maf", "0.01", "-loco", c, "-o", f"l{c}"], cwd=work,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took.append(time.perf_counter() - start)
    return sum(took) / len(took)


def recovered(out: Path, planted: dict[str, tuple[str, float]]) -> tuple[int, int]:
    top = {}
    for line in (out / "hits.tsv").read_text().splitlines()[1:]:
        trait, _locus, chrom, mb = line.split("\t")[:4]
        top[trait] = (chrom, float(mb))
    found = sum(1 for t, (chrom, mb) in planted.items()
                if t in top and top[t][0] == chrom and abs(top[t][1] - mb) <= WINDOW_MB)
    return found, len(planted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traits", type=int, default=1000)
    parser.add_argument("--serial", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        geno, _ = gnformats.write_geno(folder)
        traits, planted = simulate(folder, args.traits, args.seed)
        env = {k: v for k, v in os.environ.items() if k != "SHEEPDOG_REDIS_URL"}
        env["SHEEPDOG_HOME"] = str(folder / "home")
        out = folder / "bxd-sim"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "gemma-precompute",
                               "-g", str(geno), "-p", str(traits), "--out", str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"precompute failed:\n{done.stderr[-3000:]}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        per_trait = serial_per_trait(folder, traits, args.serial)
        found, total = recovered(out, planted)
        subprocess.run([sys.executable, "-m", "sheepdog", "redis", "stop"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serial_total = per_trait * args.traits
    print(f"precompute of {args.traits:,d} simulated BXD traits ({os.cpu_count()} cores)")
    print(f"  sheepdog gemma-precompute   {wall:8.1f} s   {args.traits / wall * 60:7.0f} "
          f"traits/min   peak memory {peak_mb:.0f} MB")
    print(f"  serial GEMMA -loco          {per_trait:8.2f} s per trait (mean of {args.serial}),"
          f" {serial_total / 60:.0f} min for all")
    print(f"  speed-up                    {serial_total / wall:8.1f}x  (target >= 25x, "
          f"<= 300 s)")
    print(f"  planted QTLs recovered      {found}/{total} = {found / max(total, 1):.0%} "
          f"(top hit within {WINDOW_MB:g} Mb)")


if __name__ == "__main__":
    main()
