"""A precomputed dataset on disk, embedded and serverless, and the index of its traits'
results in the cache.

    OUT/precompute.sqlite   traits (status, reason, top hit, metadata), peaks (by chr
                            and position), the dataset's description
    OUT/snps.npy            the SNPs in vector order: rs (U64), chr (U8), ps (int64)
    OUT/vectors/KEY.npy     one trait's vector: per SNP logp (float32, -log10 p signed
                            by the effect's direction), beta, se, af (float32), p (float64),
                            l_mle (float32)
    OUT/hits.tsv            trait locus chr mb logp effect n: each trait's top hit

numpy alone reads the .npy files (`np.load(path)`). A trait's results are also kept in
the cache under its key, so any later run of the same trait finds them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ...cache import Cache
from ...errors import FieldError

DB = "precompute.sqlite"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HITS_HEADER = ("trait", "locus", "chr", "mb", "logp", "effect", "n")
SCHEMA = """
CREATE TABLE IF NOT EXISTS dataset (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS traits (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    n INTEGER, locus TEXT, chr TEXT, mb REAL, logp REAL, effect REAL, meta TEXT);
CREATE TABLE IF NOT EXISTS peaks (
    trait TEXT NOT NULL, locus TEXT, chr TEXT NOT NULL, mb REAL NOT NULL, logp REAL NOT NULL,
    effect REAL);
CREATE INDEX IF NOT EXISTS peaks_region ON peaks (chr, mb);
CREATE INDEX IF NOT EXISTS peaks_trait ON peaks (trait);
"""


def valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name))


# -- the cache's index of traits by key
def _indexed(cache: Cache, key: str) -> tuple[Path, Path]:
    base = cache.root / "traits" / key[:2]
    return base / f"{key}.npy", base / f"{key}.json"


def cached(cache: Cache, key: str) -> bool:
    vector, record = _indexed(cache, key)
    return vector.is_file() and record.is_file()


def _write_atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def index_batch(cache: Cache, batch_dir: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Keep each scanned trait of a finished batch under its key; its records."""
    records = json.loads((batch_dir / "batch.json").read_text())["traits"]
    vectors = np.load(batch_dir / "vectors.npy", mmap_mode="r")
    for row, record in enumerate(records):
        record = dict(record, **meta)
        records[row] = record
        if record.get("status") != "done":
            continue  # a failure is not cached: the next run tries again
        vector_path, record_path = _indexed(cache, record["key"])
        if not vector_path.is_file():
            _write_atomic(vector_path, lambda f, r=row: np.save(f, np.asarray(vectors[r])))
        _write_atomic(record_path, lambda f, r=record: f.write(json.dumps(r).encode()))
    return records


def cached_record(cache: Cache, key: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(_indexed(cache, key)[1].read_text())
    return record


# -- the dataset directory
@contextmanager
def connect(out: Path) -> Iterator[sqlite3.Connection]:
    """The dataset's database (created if new); committed on leaving."""
    out.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(out / DB, timeout=60)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        yield db
        db.commit()
    finally:
        db.close()


def open_existing(out: Path) -> sqlite3.Connection:
    if not (out / DB).is_file():
        raise FieldError("dataset", f"{out.name} holds no precomputed dataset yet", 404)
    db = sqlite3.connect(f"file:{out / DB}?mode=ro", uri=True, timeout=60)
    db.row_factory = sqlite3.Row
    return db


def _link(source: Path, target: Path) -> None:
    """The vector file in the dataset: a hard link to the cache's where possible."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _put_trait(db: sqlite3.Connection, record: dict[str, Any]) -> None:
    top = record.get("top") or {}
    db.execute("DELETE FROM peaks WHERE trait = ?", (record["id"],))
    db.execute("INSERT OR REPLACE INTO traits VALUES (?,?,?,?,?,?,?,?,?,?,?)", (
        record["id"], record["key"], record["status"], record.get("reason"), record.get("n"),
        top.get("locus"), top.get("chr"), top.get("mb"), top.get("logp"), top.get("effect"),
        json.dumps(record)))
    db.executemany("INSERT INTO peaks VALUES (?,?,?,?,?,?)", [
        (record["id"], p["locus"], p["chr"], p["mb"], p["logp"], p["effect"])
        for p in record.get("peaks") or []])


def reused(record: dict[str, Any], entry: dict[str, Any], meta: dict[str, Any]
           ) -> dict[str, Any]:
    """A cached result filed under this dataset's trait: results come by the trait's
    values (its key), the name and the dataset's record from this run, never from the
    run that computed them (which is kept as `computed_by`)."""
    return {**record, **meta, "id": entry["id"], "n": entry["n"],
            "computed_by": {"dataset": record.get("dataset"), "job": record.get("job"),
                            "trait": record.get("id")}}


def begin(out: Path, cache: Cache, description: dict[str, Any],
          entries: list[dict[str, Any]], meta: dict[str, Any] | None = None,
          snps: Path | None = None) -> None:
    """Describe the dataset; each chosen trait queued, skipped, or done from the cache."""
    with connect(out) as db:
        db.executemany("INSERT OR REPLACE INTO dataset VALUES (?, ?)",
                       [(k, json.dumps(v)) for k, v in description.items()])
        for entry in entries:
            if entry.get("status") == "skipped":
                _put_trait(db, entry)
            elif cached(cache, entry["key"]):
                _put_trait(db, reused(cached_record(cache, entry["key"]), entry, meta or {}))
                _link(_indexed(cache, entry["key"])[0], out / "vectors" / f"{entry['key']}.npy")
            else:
                row = db.execute("SELECT key, status FROM traits WHERE id = ?",
                                 (entry["id"],)).fetchone()
                if row is None or row[0] != entry["key"] or row[1] != "done":
                    _put_trait(db, {**entry, "status": "queued"})
    if snps is not None and snps.is_file():
        _link(snps, out / "snps.npy")


def add(out: Path, cache: Cache, records: list[dict[str, Any]], snps: Path) -> None:
    """A finished batch's traits into the dataset."""
    _link(snps, out / "snps.npy")
    with connect(out) as db:
        for record in records:
            if record.get("status") == "done":
                _link(_indexed(cache, record["key"])[0], out / "vectors" / f"{record['key']}.npy")
            _put_trait(db, record)


def export_hits(out: Path) -> int:
    """OUT/hits.tsv from the database: one row per scanned trait; how many rows."""
    db = open_existing(out)
    try:
        rows = db.execute("SELECT id, locus, chr, mb, logp, effect, n FROM traits "
                          "WHERE status = 'done' AND locus IS NOT NULL ORDER BY rowid").fetchall()
    finally:
        db.close()
    tmp = out / f".hits.tsv.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write("\t".join(HITS_HEADER) + "\n")
        for r in rows:
            f.write(f"{r['id']}\t{r['locus']}\t{r['chr']}\t{r['mb']:.6f}\t{r['logp']:.4f}\t"
                    f"{r['effect']:.6g}\t{r['n']}\n")
    os.replace(tmp, out / "hits.tsv")
    return len(rows)


# -- reading
def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def counts(out: Path) -> dict[str, int]:
    db = open_existing(out)
    try:
        return dict(db.execute("SELECT status, COUNT(*) FROM traits GROUP BY status").fetchall())
    finally:
        db.close()


def description(out: Path) -> dict[str, Any]:
    db = open_existing(out)
    try:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM dataset")}
    finally:
        db.close()


def show(out: Path, trait: str, vector: bool = False) -> dict[str, Any]:
    """One trait's metadata and peaks (and its vector); 404 unknown, 409 not scanned."""
    db = open_existing(out)
    try:
        row = db.execute("SELECT * FROM traits WHERE id = ?", (trait,)).fetchone()
    finally:
        db.close()
    if row is None:
        raise FieldError("trait", f"no such trait {trait!r} in {out.name}", 404)
    record = json.loads(row["meta"])
    if row["status"] in ("skipped", "failed"):
        raise FieldError("trait", f"{trait}: {row['status']}: {row['reason']}", 409)
    if row["status"] != "done":
        raise FieldError("trait", f"{trait}: {row['status']}, not scanned yet", 409)
    found = {"trait": trait, "status": "done", "n": row["n"], "key": row["key"],
             "top": record.get("top"), "peaks": record.get("peaks", []),
             "metadata": {k: v for k, v in record.items() if k not in ("top", "peaks")}}
    if vector:
        found["snps"] = list(vector_rows(out, row["key"]))
    return found


def vector_rows(out: Path, key: str) -> Iterator[dict[str, Any]]:
    snps = np.load(out / "snps.npy")
    values = np.load(out / "vectors" / f"{key}.npy")
    for s, v in zip(snps.tolist(), values.tolist(), strict=True):
        yield {"rs": s[0], "chr": s[1], "ps": s[2], "logp": _clean(v[0]), "beta": _clean(v[1]),
               "se": _clean(v[2]), "af": _clean(v[3]), "p": _clean(v[4]),
               "l_mle": _clean(v[5]) if len(v) > 5 else None}


def hits(out: Path, chrom: str | None = None, start: float | None = None,
         end: float | None = None, minimum: float | None = None, limit: int = 100,
         offset: int = 0) -> dict[str, Any]:
    """Traits with a peak in a region (Mb), strongest first, one page."""
    where: list[str] = []
    args: list[Any] = []
    if chrom is not None:
        where.append("chr = ?")
        args.append(chrom)
    if start is not None:
        where.append("mb >= ?")
        args.append(start)
    if end is not None:
        where.append("mb <= ?")
        args.append(end)
    if minimum is not None:
        where.append("logp >= ?")
        args.append(minimum)
    sql = "FROM peaks" + (" WHERE " + " AND ".join(where) if where else "")
    db = open_existing(out)
    try:
        total = db.execute(f"SELECT COUNT(*) {sql}", args).fetchone()[0]
        rows = db.execute(f"SELECT trait, locus, chr, mb, logp, effect {sql} "
                          "ORDER BY logp DESC, trait LIMIT ? OFFSET ?",
                          [*args, limit, offset]).fetchall()
    finally:
        db.close()
    found = [dict(r) for r in rows]
    following = offset + len(found)
    return {"total": total, "offset": offset, "hits": found,
            "next_offset": following if following < total else None}


def chromosome_lengths(out: Path) -> dict[str, float]:
    """Each chromosome's last SNP position (bp), from the dataset's SNP table."""
    path = out / "snps.npy"
    if not path.is_file():
        return {}
    snps = np.load(path)
    lengths: dict[str, float] = {}
    for chrom, ps in zip(snps["chr"].tolist(), snps["ps"].tolist(), strict=True):
        lengths[chrom] = max(lengths.get(chrom, 0.0), float(ps))
    return lengths


def write_lmdb(out: Path, folder: Path) -> list[Path]:
    """Every scanned trait as gemma-wrapper's gemma2lmdb.py writes a scan, one file per
    trait, `FOLDER/<trait id>.mdb` (a trait id that is not a plain file name gets its
    key instead): the SNPs GEMMA tested, in genome order, and the trait's record."""
    from ..scan.lmdbout import write_rows

    db = open_existing(out)
    try:
        rows = db.execute("SELECT id, key, meta FROM traits WHERE status = 'done' "
                          "ORDER BY rowid").fetchall()
    finally:
        db.close()
    snps = np.load(out / "snps.npy")
    written = []
    for row in rows:
        name = row["id"] if NAME.fullmatch(row["id"]) else row["key"]
        path = folder / f"{name}.mdb"
        snp_rows = ((s["chr"], s["ps"], s["rs"],
                     (s["af"], s["beta"], s["se"], s["l_mle"] or math.nan, s["p"]),
                     f"{s['p']:.6e}") for s in vector_rows(out, row["key"])
                    if s["p"] is not None)
        write_rows(snp_rows, path, f"trait {row['id']}", len(snps) * 64,
                   extra={"sheepdog": json.loads(row["meta"])})
        written.append(path)
    return written


def top_hits(out: Path) -> list[dict[str, Any]]:
    """Every scanned trait's genome-wide top hit (for the dataset's QTL map)."""
    db = open_existing(out)
    try:
        return [dict(r) for r in db.execute(
            "SELECT id AS trait, locus, chr, mb, logp, effect, n FROM traits "
            "WHERE status = 'done' AND locus IS NOT NULL")]
    finally:
        db.close()
