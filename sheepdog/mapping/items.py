"""Items and placeholders for `sheepdog map`: read, checked, sampled, rendered.

Pure: no Redis, no processes. Every problem is an InputError naming the file and line,
or the placeholder, before anything runs.
"""

from __future__ import annotations

import csv
import glob
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError

# GNU parallel's replacement strings, plus CSV columns by name and staged files
PLACEHOLDER = re.compile(r"\{(#|/|//|\.|/\.|file:[A-Za-z_][\w.-]*|[A-Za-z_][\w.-]*)?\}")
MAX_ITEMS_LINE = 1 << 20  # bytes: a longer line is refused, not read whole


@dataclass(frozen=True)
class Item:
    """One item: its 1-based position, its key, the whole item, and its CSV columns."""

    index: int
    key: str
    value: str
    columns: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file (or option, or field) it came from, for messages
    line: int | None = None

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line}" if self.line is not None else self.source

    def error(self, problem: str) -> InputError:
        """A problem with this item, naming its file and line."""
        return InputError(self.source, problem, line=self.line)


WHOLE = "item"  # input name of an item that is itself a staged file (--files)

# One argument of a rendered command: literal text, and staged files by input name.
Part = str | dict[str, str]


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(str(path), "no such items file") from None
    except OSError as e:
        raise InputError(str(path), f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(str(path), "not UTF-8 text", line=line) from None
    if not text.strip():
        raise InputError(str(path), "the items file is empty")
    return text.removeprefix("\ufeff")


def _check_lengths(path: Path, lines: list[str]) -> None:
    for n, line in enumerate(lines, 1):
        if len(line) > MAX_ITEMS_LINE:
            raise InputError(str(path), f"line is {len(line):,d} characters; at most "
                             f"{MAX_ITEMS_LINE:,d}", line=n)


def unique(items: list[Item], what: str) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        if item.key in seen:
            first = seen[item.key]
            raise item.error(f"duplicate key {_short(item.key)!r} (first at {first.where}); "
                             "keys must be unique")
        seen[item.key] = item
    return items


def _short(text: str, most: int = 60) -> str:
    return text if len(text) <= most else text[:most] + "…"


def read_lines(path: Path) -> list[Item]:
    """One item per non-blank line; the line is its key (so keys must be unique)."""
    lines = _decode(path).splitlines()
    _check_lengths(path, lines)
    items = [Item(0, line, line, {}, str(path), n) for n, line in enumerate(lines, 1)
             if line.strip()]
    return unique(_numbered(items), str(path))


def _numbered(items: list[Item]) -> list[Item]:
    return [Item(i, it.key, it.value, it.columns, it.source, it.line)
            for i, it in enumerate(items, 1)]


def _dialect(path: Path, header: str) -> str:
    name = path.name.removesuffix(".gz").lower()
    if name.endswith(".tsv") or name.endswith(".tab") or ("\t" in header and "," not in header):
        return "\t"
    return ","


def _header(path: Path, reader: Any, key: str | None) -> list[str]:
    """The table's column names: unique, `key` among them."""
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise InputError(str(path), f"bad header: {e}", line=1) from None
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise InputError(str(path), f"column {dup!r} appears twice in the header", line=1)
    if key is not None and key not in header:
        raise InputError(str(path), f"--key {key!r} is not a column; the header has "
                         f"{', '.join(header)}", line=1)
    return header


def read_table(path: Path, key: str | None) -> list[Item]:
    """A CSV/TSV with a header: each row an item, `key` its key column (else its number)."""
    text = _decode(path)
    lines = text.splitlines()
    _check_lengths(path, lines)
    delimiter = _dialect(path, lines[0])
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    header = _header(path, reader, key)
    items: list[Item] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            items.append(_row(path, header, row, key, len(items) + 1, reader.line_num,
                              delimiter))
    except csv.Error as e:
        raise InputError(str(path), f"bad CSV: {e}", line=reader.line_num) from None
    if not items:
        raise InputError(str(path), "the items file has a header but no rows")
    return unique(items, str(path))


def _row(path: Path, header: list[str], row: list[str], key: str | None, index: int, n: int,
         delimiter: str) -> Item:
    """Line n of the table, the index-th item."""
    if len(row) != len(header):
        raise InputError(str(path), f"{len(row)} fields, but the header has {len(header)}",
                         line=n)
    columns = dict(zip(header, row, strict=True))
    item_key = columns[key] if key is not None else str(index)
    if key is not None and not item_key.strip():
        raise InputError(str(path), f"empty key in column {key!r}", line=n)
    value = row[0] if len(row) == 1 else delimiter.join(row)
    return Item(index, item_key, value, columns, str(path), n)


def read_items(path: Path, key: str | None = None) -> list[Item]:
    """Items from a file: a CSV/TSV (by extension, or --key) or one item per line."""
    name = path.name.lower()
    if key is not None or name.endswith((".csv", ".tsv", ".tab")):
        return read_table(path, key)
    return read_lines(path)


def read_range(spec: str) -> list[Item]:
    """`A:B`, both ends included, as `seq A B` gives them."""
    match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", spec)
    if not match:
        raise InputError("--range", f"{_short(spec)!r} is not A:B (two whole numbers)")
    first, last = int(match[1]), int(match[2])
    if last < first:
        raise InputError("--range", f"{first}:{last} is empty (B is below A)")
    if last - first >= 10_000_000:
        raise InputError("--range", "more than 10,000,000 items")
    return [Item(i + 1, str(n), str(n), {}, f"--range item {i + 1}")
            for i, n in enumerate(range(first, last + 1))]


def read_files(pattern: str) -> list[Item]:
    """Files matching a glob (sorted); each is staged by content wherever it runs."""
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise InputError("--files", f"no file matches {_short(pattern)!r}")
    return [Item(i, p, p, {}, "--files") for i, p in enumerate(paths, 1)]


def sample(items: list[Item], count: int, seed: int) -> list[Item]:
    """A reproducible sample of `count` items, kept in input order."""
    if count < 1:
        raise InputError("--sample", "must be at least 1")
    if count > len(items):
        raise InputError("--sample", f"{count:,d} is more than the {len(items):,d} items")
    chosen = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in chosen]


# ---------------------------------------------------------------- placeholders


def placeholders(template: list[str]) -> list[str]:
    """Every placeholder the command uses, e.g. ['#', 'id', 'file:path']."""
    return [m[1] or "" for arg in template for m in PLACEHOLDER.finditer(arg)]


def check_template(template: list[str], columns: list[str] | None, files: bool,
                   append: bool = True) -> None:
    """Refuse an unknown placeholder ({itme}) before anything runs; a command with none
    gets the item last (unless `append` is off: GNU parallel's -N0)."""
    if not template:
        raise InputError("command", "give the command to run after '--'")
    known = set(columns or [])
    for name in placeholders(template):
        if name in ("", "#", "/", "//", ".", "/."):
            continue
        column = name.removeprefix("file:")
        if column in known:
            continue
        where = (f"the columns are {', '.join(sorted(known))}" if known
                 else "only a CSV/TSV with a header has named columns")
        raise InputError("command", f"unknown placeholder {{{name}}}: {where}; GNU "
                         "parallel's {} {#} {/} {//} {.} {/.} work for every item")
    if append and not files and not any(PLACEHOLDER.search(arg) for arg in template):
        # like GNU parallel: no placeholder means the item goes last
        template.append("{}")


def _path_forms(value: str) -> dict[str, str]:
    path = PurePosixPath(value)
    stem = str(path.with_suffix("")) if path.suffix else value
    return {"/": path.name, "//": str(path.parent), ".": stem,
            "/.": path.stem if path.suffix else path.name}


def render(template: list[str], item: Item, staged: set[str]) -> list[list[Part]]:
    """The item's command: each argument as parts, a staged file as {"input": NAME}.

    `staged` holds WHOLE when the item itself is a file to stage (--files); `{file:COL}`
    always stages that column's path.
    """
    argv = []
    for arg in template:
        parts: list[Part] = []
        last = 0
        for m in PLACEHOLDER.finditer(arg):
            if m.start() > last:
                parts.append(arg[last:m.start()])
            parts.append(_value(m[1] or "", item, staged))
            last = m.end()
        if last < len(arg):
            parts.append(arg[last:])
        argv.append(_merge(parts) or [""])
    return argv


def _value(name: str, item: Item, staged: set[str]) -> Part:
    if name == "#":
        return str(item.index)
    if name.startswith("file:"):
        return {"input": name}
    if name == "" and WHOLE in staged:
        return {"input": WHOLE}
    if name in ("/", "//", ".", "/."):
        return _path_forms(item.value)[name]
    if name == "":
        return item.value
    return item.columns[name]


def _merge(parts: list[Part]) -> list[Part]:
    out: list[Part] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif p != "":
            out.append(p)
    return out


def staged_paths(template: list[str], item: Item, files: bool) -> dict[str, str]:
    """The files this item stages: input name -> local path."""
    found = {}
    if files:
        found[WHOLE] = item.value
    for name in placeholders(template):
        if name.startswith("file:"):
            found[name] = item.columns[name.removeprefix("file:")]
    return found
