"""A merged GEMMA scan as gemma-wrapper's `gemma2lmdb.py` writes it, for GN's precompute.

One LMDB file (no subdirectory). Key: `>cL` — the chromosome as one byte (its number,
or ASCII 'X' = 88 / 'Y' = 89) and the position as a big-endian unsigned 32-bit
integer, so keys sort in genome order. Value: `=fffff` — af, beta, se, l_mle, p_lrt
as float32. Key `meta`: JSON {"type": "gemma-assoc", "version": 1.0, "key-format",
"rec-format", "hits": [[chr, pos, rs, p], ...] (−log10 p ≥ 4), "log": {file: text}}.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from ...errors import SheepdogError
from ..commands import minus_log10, p_value

KEY_FORMAT = ">cL"
REC_FORMAT = "=fffff"
HIT_LOD = 4.0
_COLUMNS = ("af", "beta", "se", "l_mle", "p_lrt")


def chromosome_byte(name: str) -> int:
    """gemma2lmdb's chromosome code: the number itself, X and Y as their ASCII values."""
    plain = name.removeprefix("chr")
    if plain in ("X", "Y"):
        return ord(plain)
    if plain.isdigit() and 0 < int(plain) < ord("X"):
        return int(plain)
    raise SheepdogError(f"chromosome {name!r} has no code in gemma2lmdb's key format")


def key(chromosome: str, position: int) -> bytes:
    return struct.pack(KEY_FORMAT, bytes([chromosome_byte(chromosome)]), position)


# one SNP: chromosome, position, rs, (af, beta, se, l_mle, p) and p as GEMMA printed it
Row = tuple[str, int, str, tuple[float, ...], str]


def write(assoc: Path, db: Path, logs: dict[str, str] | None = None,
          hit_lod: float = HIT_LOD) -> dict[str, object]:
    """Write one assoc.txt (an -lmm 9 scan) into a new LMDB file; returns its meta."""
    with open(assoc) as f:
        header = f.readline().rstrip("\n").split("\t")
        missing = [c for c in ("chr", "ps", "rs", *_COLUMNS) if c not in header]
        if missing:
            raise SheepdogError(f"{assoc}: no {', '.join(missing)} column (an LMDB "
                                "needs GEMMA's -lmm 9 output)")
        at = {name: header.index(name) for name in header}

        def rows() -> Iterator[Row]:
            for line in f:
                cols = line.rstrip("\n").split("\t")
                yield (cols[at["chr"]], int(cols[at["ps"]]), cols[at["rs"]],
                       tuple(float(cols[at[c]]) for c in _COLUMNS), cols[at["p_lrt"]])

        return write_rows(rows(), db, str(assoc), assoc.stat().st_size * 4, logs, hit_lod)


def write_rows(rows: Iterable[Row], db: Path, source: str, size_hint: int = 0,
               logs: dict[str, str] | None = None, hit_lod: float = HIT_LOD,
               extra: dict[str, object] | None = None) -> dict[str, object]:
    """Write SNP rows into a new LMDB file, whole or not at all; returns its meta."""
    import lmdb  # only needed when an LMDB is asked for

    meta: dict[str, object] = {"type": "gemma-assoc", "version": 1.0,
                               "key-format": KEY_FORMAT, "rec-format": REC_FORMAT,
                               **(extra or {})}
    hits: list[list[object]] = []
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.tmp")
    tmp.unlink(missing_ok=True)
    with lmdb.open(str(tmp), subdir=False, map_size=max(1 << 24, size_hint),
                   lock=False) as env:
        with env.begin(write=True) as txn:
            for chrom, pos, rs, values, printed in rows:
                if not txn.put(key(chrom, pos), struct.pack(REC_FORMAT, *values),
                               overwrite=False):
                    raise SheepdogError(f"{source}: two SNPs at {chrom}:{pos} (gemma2lmdb "
                                        "keys by position)")
                p = p_value(printed)  # GEMMA's nan is stored, never a hit
                if p is not None and minus_log10(p, math.inf) >= hit_lod:
                    hits.append([chromosome_byte(chrom), pos, rs, printed])
        meta["hits"] = hits
        meta["log"] = dict(logs or {})
        with env.begin(write=True) as txn:
            txn.put(b"meta", json.dumps(meta).encode())
    tmp.replace(db)  # whole, or not at all
    return meta


def read(db: Path) -> tuple[dict[str, object], dict[tuple[int, int], tuple[float, ...]]]:
    """(meta, {(chromosome code, position): (af, beta, se, l_mle, p_lrt)})."""
    import lmdb

    records: dict[tuple[int, int], tuple[float, ...]] = {}
    with lmdb.open(str(db), subdir=False, readonly=True, lock=False) as env, \
            env.begin() as txn:
        raw = txn.get(b"meta")
        if raw is None:
            raise SheepdogError(f"{db}: no meta record (not a gemma2lmdb file)")
        meta = json.loads(raw)
        for k, v in txn.cursor():
            if k == b"meta":
                continue
            chrom, pos = struct.unpack(KEY_FORMAT, k)
            records[(chrom[0], pos)] = struct.unpack(REC_FORMAT, v)
    return meta, records
