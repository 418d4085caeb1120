"""Genotypes in any of the formats GN uses (BIMBAM, GN `.geno`, R/qtl2), turned into the
BIMBAM genotype and annotation files the split reads, once per content; and the
phenotype and covariate tables matched to them (by id where the genotypes have ids)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...cache import Cache, sha256_file
from ...errors import InputError
from . import genofile, qtl2, traits

BIMBAM, GENO, QTL2 = "bimbam", "geno", "qtl2"


@dataclass
class Genotypes:
    """BIMBAM copies of the user's genotypes, and who is in which column."""

    kind: str
    source: Path  # the file the user gave (.geno, control file, BIMBAM)
    geno: Path
    anno: Path
    individuals: list[str] | None  # None: BIMBAM, matched by order
    count: int
    control: qtl2.Control | None = None

    def traits(self, path: Path, what: str = "trait") -> traits.Aligned:
        """A trait or covariate table in these genotypes' individual order."""
        if self.individuals is None and not traits.has_header(path):
            return _bimbam_table(path, self.count, what)
        if self.control is not None and path in (self.control.pheno, self.control.covar):
            table = traits.read(path, self.control.sep, self.control.na_strings,
                                self.control.comment, what)
        else:
            table = traits.read(path, what=what)
        if self.individuals is None:
            return traits.by_order(table, self.count, self.source)
        return traits.align(table, self.individuals, self.source)


def _bimbam_table(path: Path, count: int, what: str) -> traits.Aligned:
    from .bimbam import read_table

    rows = read_table(path, what)
    if len(rows) != count:
        raise InputError(str(path), f"has {len(rows)} rows but the genotype file has "
                         f"{count} individuals (one row per individual, in order)")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(str(path), f"rows have different numbers of columns: {sorted(widths)}")
    values = np.array([[np.nan if v == "NA" else float(v) for v in r] for r in rows])
    return traits.Aligned([str(i + 1) for i in range(values.shape[1])], values, 0)


def kind_of(path: Path) -> str:
    if qtl2.looks_like_control(path):
        return QTL2
    if genofile.looks_like_geno(path):
        return GENO
    return BIMBAM


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def load(store: Cache, geno: Path, anno: Path | None, confine: tuple[str, ...] = ()
         ) -> Genotypes:
    """The genotypes as BIMBAM in the store, converted once per content; `confine`: the
    directories an R/qtl2 control file's files must be in (see qtl2.read_control)."""
    kind = kind_of(geno)
    if kind == BIMBAM:
        if anno is None:
            raise InputError(str(geno), "BIMBAM genotypes need an annotation file (-a) with "
                             "each SNP's position; GN .geno and R/qtl2 files carry their own")
        from .bimbam import geno_fields, lines

        count = next((len(geno_fields(t)) - 3 for _, t in lines(geno)), 0)
        return Genotypes(BIMBAM, geno, geno, anno, None, count)
    if anno is not None:
        raise InputError(str(anno), f"an annotation file is only for BIMBAM genotypes; "
                         f"{geno} ({'GN .geno' if kind == GENO else 'R/qtl2'}) has positions")
    control = qtl2.read_control(geno, confine) if kind == QTL2 else None
    digest = _digest([geno, *(control.files() if control else [])])
    manifest = store.root / "converted" / f"{digest[:40]}.json"
    known = json.loads(manifest.read_text()) if manifest.exists() else None
    if known and all(store.blob(known[k]).exists() for k in ("geno", "anno")):
        return Genotypes(kind, geno, store.blob(known["geno"]), store.blob(known["anno"]),
                         known["individuals"], len(known["individuals"]), control)
    tag = f"{os.getpid()}.{threading.get_ident()}"
    geno_tmp, anno_tmp = store.tmp / f"conv.geno.{tag}", store.tmp / f"conv.anno.{tag}"
    try:
        with open(geno_tmp, "w") as g, open(anno_tmp, "w") as a:
            if control is not None:
                individuals = qtl2.convert(control, g, a)
            else:
                individuals = genofile.convert(geno, g, a).individuals
        known = {"geno": sha256_file(geno_tmp), "anno": sha256_file(anno_tmp),
                 "individuals": individuals}
        store.put_blob_file(geno_tmp, known["geno"])
        store.put_blob_file(anno_tmp, known["anno"])
    finally:
        geno_tmp.unlink(missing_ok=True)
        anno_tmp.unlink(missing_ok=True)
    manifest.parent.mkdir(exist_ok=True)
    tmp = manifest.with_suffix(f".{tag}")
    tmp.write_text(json.dumps(known))
    tmp.replace(manifest)
    return Genotypes(kind, geno, store.blob(known["geno"]), store.blob(known["anno"]),
                     individuals, len(individuals), control)
