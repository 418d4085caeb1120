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
from pathlib import Path

from ..errors import SheepdogError
from .commands import minus_log10, p_value

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


def write(assoc: Path, db: Path, logs: dict[str, str] | None = None,
          hit_lod: float = HIT_LOD) -> dict[str, object]:
    """Write one assoc.txt (an -lmm 9 scan) into a new LMDB file; returns its meta."""
    import lmdb  # only needed when an LMDB is asked for

    meta: dict[str, object] = {"type": "gemma-assoc", "version": 1.0,
                               "key-format": KEY_FORMAT, "rec-format": REC_FORMAT}
    hits: list[list[object]] = []
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.tmp")
    tmp.unlink(missing_ok=True)
    size = max(1 << 24, assoc.stat().st_size * 4)
    with lmdb.open(str(tmp), subdir=False, map_size=size, lock=False) as env:
        with env.begin(write=True) as txn, open(assoc) as f:
            header = f.readline().rstrip("\n").split("\t")
            missing = [c for c in ("chr", "rs", "ps", *_COLUMNS) if c not in header]
            if missing:
                raise SheepdogError(f"{assoc}: no {', '.join(missing)} column (an LMDB "
                                    "needs GEMMA's -lmm 9 output)")
            at = {name: header.index(name) for name in header}
            for line in f:
                cols = line.rstrip("\n").split("\t")
                k = key(cols[at["chr"]], int(cols[at["ps"]]))
                values = [float(cols[at[c]]) for c in _COLUMNS]
                if not txn.put(k, struct.pack(REC_FORMAT, *values), overwrite=False):
                    raise SheepdogError(f"{assoc}: two SNPs at {cols[at['chr']]}:"
                                        f"{cols[at['ps']]} (gemma2lmdb keys by position)")
                p = p_value(cols[at["p_lrt"]])  # GEMMA's nan is stored, never a hit
                if p is not None and minus_log10(p, math.inf) >= hit_lod:
                    hits.append([chromosome_byte(cols[at["chr"]]), int(cols[at["ps"]]),
                                 cols[at["rs"]], cols[at["p_lrt"]]])
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
