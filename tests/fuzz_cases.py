"""Property-based cases for every input parser (used by tests/test_fuzz.py with a fixed
seed and a bounded example count, and by bench/fuzz.py for as long as one likes).

The property: whatever the bytes, a parser gives a result or an InputError that names
the file (and the line where there is one) — never any other exception; the REST API
answers a 2xx or a 4xx JSON error naming the field — never a 5xx."""

from __future__ import annotations

import atexit
import gzip
import io
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from sheepdog.errors import InputError
from sheepdog.gemma.formats import bimbam, genofile, traits

TOKENS = ["0", "1", "0.5", "2", "-1", "1e5", "nan", "inf", "NA", "rs1", "rs2", "X", "Y",
          "chr1", "1", "19", "MT", "Un", "B", "D", "H", "U", "@mat:B", "@het:H", "#", "id",
          "Chr", "Locus", "cM", "Mb", "", "é", "\x00", "1,", "9" * 400]
SEPARATORS = [",", ", ", " ", "\t", "\t\t"]
ENDINGS = ["\n", "\r\n", "\r", ""]


@st.composite
def table_text(draw: st.DrawFn) -> bytes:
    """Lines of tokens with mixed separators and endings; sometimes gzipped or cut."""
    rows = draw(st.lists(st.lists(st.one_of(st.sampled_from(TOKENS),
                                            st.text(max_size=6)), max_size=8), max_size=12))
    sep = draw(st.sampled_from(SEPARATORS))
    end = draw(st.sampled_from(ENDINGS))
    text = "".join(sep.join(r) + end for r in rows).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["plain", "plain", "gzip", "cut-gzip", "bytes"]))
    if how == "gzip":
        return gzip.compress(text)
    if how == "cut-gzip":
        packed = gzip.compress(text)
        return packed[:max(2, len(packed) // 2)]
    if how == "bytes":
        return draw(st.binary(max_size=200))
    return text


_ROOT: list[Path] = []  # one folder per process for every case's files, removed at exit


def _file(data: bytes, name: str) -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="sheepdog-fuzz-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    folder = Path(tempfile.mkdtemp(dir=_ROOT[0]))
    path = folder / name
    path.write_bytes(data)
    return path


def clear(error: InputError, path: Path) -> None:
    assert str(path) in str(error) or error.where.startswith(("inputs", "bundle")), error


def annotation_and_geno(anno: bytes, geno: bytes) -> None:
    a, g = _file(anno, "anno.txt"), _file(geno, "geno.txt")
    try:
        bimbam.split_genotypes(g, a, a.parent / "split")
    except InputError as e:
        assert str(a) in str(e) or str(g) in str(e), e


def phenotypes(data: bytes, individuals: int, column: int) -> None:
    path = _file(data, "pheno.txt")
    try:
        bimbam.check_phenotypes(path, individuals, column)
    except InputError as e:
        clear(e, path)


def covariates(data: bytes, individuals: int) -> None:
    path = _file(data, "covariates.txt")
    try:
        bimbam.check_covariates(path, individuals)
    except InputError as e:
        clear(e, path)


def geno_file(data: bytes) -> None:
    path = _file(data, "x.geno")
    try:
        genofile.convert(path, io.StringIO(), io.StringIO())
    except InputError as e:
        clear(e, path)


def trait_table(data: bytes) -> None:
    path = _file(data, "traits.tsv")
    try:
        table = traits.read(path)
        traits.align(table, ["a", "b", "1"], Path("g"))
    except InputError as e:
        assert str(path) in str(e), e


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=12)


@st.composite
def job_bodies(draw: st.DrawFn) -> object:
    """POST /jobs bodies: mostly almost-right ones, some anything at all."""
    if draw(st.booleans()):
        return draw(JSON_VALUES)
    body: dict[str, object] = {"workflow": draw(st.sampled_from(
        ["command", "gemma-loco", "gemma-permute", "gemma-precompute", "map", "python",
         "nope", ""]))}
    for field in ("command", "inputs", "params", "items", "name", "queue", "backend",
                  "template", "timeout", "env"):
        if draw(st.booleans()):
            body[field] = draw(JSON_VALUES)
    return body
