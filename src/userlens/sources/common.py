"""What the file readers share: encodings and compression, epoch units, tables that must match.

- `text_encoding` tells UTF-8 (with or without a byte-order mark) from UTF-16 (with one) by the
  first bytes and refuses binary data or UTF-16 without a mark; `plain_text` hands polars a
  UTF-8 file: the file itself, or a temporary copy decompressed (.gz) and/or decoded.
- `record_blocks` cuts a delimited text file into blocks of whole records, so a reader parses
  one block at a time and memory follows what it keeps, not the size of the text.
- `invalid_utf8` finds the first byte that is not UTF-8, streaming, for the error message.
- `epoch_seconds` detects epoch milliseconds, microseconds or nanoseconds by their magnitude
  and converts them to seconds, or refuses a column that mixes units.
- `missing_ids` compares the ids of an items or users file with those of the interactions.
"""

from __future__ import annotations

import codecs
import gzip
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from userlens.errors import DataError

HEAD_BYTES = 1 << 16
CHUNK = 1 << 20
BLOCK = 16 << 20  # bytes of text parsed at a time
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
UTF8_FIX = "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW)"
# Epoch values below 1e11 s (year 5138) are seconds; each unit above is 1000x the one before.
# A millisecond value then reads as seconds only before 1973, which validation's
# min_timestamp refuses anyway.
EPOCH_UNITS = (("seconds", 1), ("milliseconds", 10**3), ("microseconds", 10**6), ("nanoseconds", 10**9))
SECONDS_LIMIT = 10**11
# What follows from ids of the interactions missing from the items or the users file.
UNKNOWN_ITEMS = "validation.repair.unknown_items decides (fail, or drop those interactions)"
NO_ATTRIBUTES = "those users have no attributes"


def text_encoding(path: Path, head: bytes, kind: str = "CSV") -> str | None:
    """'utf-16' when `head` starts with a UTF-16 byte-order mark, else None (UTF-8 is assumed;
    polars strips a UTF-8 mark). NUL bytes without a mark are refused: UTF-16 or binary."""
    if head.startswith(UTF16_BOMS):
        return "utf-16"
    if b"\x00" in head:
        if head.count(0) > len(head) // 4:  # every other byte of ASCII text in UTF-16
            raise DataError(f"{path}: looks like UTF-16 text without a byte-order mark; re-save it as UTF-8")
        raise DataError(f"{path}: looks like binary data, not {kind} text")
    return None


@contextmanager
def plain_text(path: Path, notes: list[str], kind: str = "CSV") -> Iterator[Path]:
    """A UTF-8 file with the text of `path`: `path` itself, or a temporary copy (removed
    afterwards) when it is gzip-compressed or UTF-16. The copy goes beside the snapshot
    folder, on the disk that holds the data, never in memory: large files stay streamed."""
    gz = path.name.lower().endswith(".gz")
    opener = (lambda: gzip.open(path, "rb")) if gz else (lambda: open(path, "rb"))
    try:
        with opener() as fh:
            head = fh.read(HEAD_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _gzip_error(path, exc) from None
    encoding = text_encoding(path, head, kind)
    if not gz and encoding is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=".userlens-text-", dir=path.parent.parent) as tmp:
        plain = Path(tmp) / path.name.removesuffix(".gz").removesuffix(".GZ")
        try:
            with opener() as src, open(plain, "wb") as dst:
                if encoding is None:
                    shutil.copyfileobj(src, dst, CHUNK)
                else:
                    reader = codecs.getreader(encoding)(src)  # the codec drops the byte-order mark
                    while text := reader.read(CHUNK):
                        dst.write(text.encode("utf-8"))
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise _gzip_error(path, exc) from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 ({exc.reason})") from None
        if encoding is not None:
            notes.append(f"{path}: decoded from UTF-16 (its byte-order mark says so)")
        yield plain


def _gzip_error(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: not a complete gzip file ({exc}); compress it again (gzip -k FILE)")


def record_blocks(path: Path, size: int = BLOCK) -> Iterator[bytes]:
    """The records after the header line of a delimited text file, in blocks of about `size`
    bytes. A block ends at a line end outside quotes: one with an even number of quotes before
    it (a quoted value may hold newlines; a quote inside one is doubled)."""
    with open(path, "rb") as fh:
        header = fh.readline()
        while header.count(b'"') % 2 and (more := fh.readline()):
            header += more
        carry = b""
        while block := fh.read(size):
            data = carry + block
            end = data.rfind(b"\n")
            quotes = data.count(b'"', 0, max(end, 0))
            while end >= 0 and quotes % 2:  # walk back to a line end outside quotes
                previous = data.rfind(b"\n", 0, end)
                quotes -= data.count(b'"', max(previous, 0), end)
                end = previous
            if end < 0 and len(data) < 4 * size:  # one record longer than a block: read on
                carry = data
                continue
            end = end if end >= 0 else len(data) - 1  # an open quote: the parser reports it
            yield data[: end + 1]
            carry = data[end + 1 :]
        if carry.strip():
            yield carry


def invalid_utf8(path: Path) -> tuple[int, bytes, int] | None:
    """(line number, the line's bytes, offset of the bad byte in it) of the first byte of `path`
    that is not UTF-8, read in chunks; None when it is all UTF-8."""
    line, carry = 1, b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK)
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
                good = len(data)
            except UnicodeDecodeError as exc:
                if chunk and exc.reason == "unexpected end of data":  # a character cut at the chunk's end
                    good, carry = exc.start, data[exc.start :]
                else:
                    start = data.rfind(b"\n", 0, exc.start) + 1
                    end = data.find(b"\n", exc.start)
                    text = data[start : end if end >= 0 else len(data)]
                    return line + data.count(b"\n", 0, start), text.rstrip(b"\r"), exc.start - start
            line += data.count(b"\n", 0, good)
            if not chunk:
                return None


def field_at(line: bytes, offset: int, separator: str) -> int:
    """0-based index of the field holding byte `offset` of a delimited line (quotes respected)."""
    quoted, field = False, 0
    sep = separator.encode()
    for i, byte in enumerate(line[:offset]):
        if byte == 0x22:  # '"'
            quoted = not quoted
        elif not quoted and line[i : i + len(sep)] == sep:
            field += 1
    return field


def epoch_seconds(values: pl.Series, path: Path, where: Callable[[int], str]) -> tuple[pl.Series, str | None]:
    """Epoch timestamps (Int64) in seconds. A column whose every value is in milliseconds,
    microseconds or nanoseconds (by magnitude) is divided down and a note says so; one that
    mixes units is refused, naming a few rows of the smaller group (`where(row)` names a row)."""
    largest = values.abs().max()
    if largest is None or largest < SECONDS_LIMIT:  # the usual case, in one pass
        return values, None
    unit = pl.Series([0] * len(values), dtype=pl.Int8)
    for i in range(1, len(EPOCH_UNITS)):
        unit += (values.abs() >= SECONDS_LIMIT * 1000 ** (i - 1)).cast(pl.Int8)
    unit = unit.set(values.is_null(), None)
    counts = unit.drop_nulls().value_counts(sort=True)  # the most common unit first
    if counts.height > 1:
        minority, n = counts.row(-1)
        rows = (unit == minority).arg_true().head(3)
        shown = ", ".join(f"{values[r]} ({where(r)})" for r in rows)
        units = " and ".join(EPOCH_UNITS[u][0] for u in sorted(counts.to_series(0)))
        raise DataError(
            f"{path}: column timestamp mixes epoch {units}: {n:,} value(s) look like "
            f"{EPOCH_UNITS[minority][0]}, e.g. {shown}; write every timestamp in one unit"
        )
    if counts.height == 0 or counts.row(0)[0] == 0:
        return values, None
    name, factor = EPOCH_UNITS[counts.row(0)[0]]
    note = f"{path}: column timestamp holds epoch {name} (e.g. {values.drop_nulls()[0]}); converted to seconds"
    return values // factor, note


def missing_ids(
    interactions: pl.DataFrame,
    table: pl.DataFrame,
    key: str,
    path: Path,
    interactions_path: Path,
    consequence: str,
    refuse_disjoint: bool = True,
) -> str | None:
    """A note when some ids of the interactions are not in `table` (read from `path`); with
    `refuse_disjoint` a DataError when none is: another dataset's file, or ids written differently."""
    # One hash lookup per row into the (small) table's ids; the interactions' own ids are
    # deduplicated only when some are missing (the usual case has none).
    known = table[key].drop_nulls().unique().implode()
    unmatched = interactions.select(key).filter(pl.col(key).is_not_null() & ~pl.col(key).is_in(known))
    if unmatched.is_empty():
        return None
    missing = unmatched[key].unique(maintain_order=True)
    used = interactions[key].drop_nulls()
    n_used = used.n_unique()
    if missing.len() == n_used and refuse_disjoint:
        theirs = table[key].drop_nulls().head(1).to_list()
        raise DataError(
            f"{path}: column {key}: none of the {n_used:,} ids in {interactions_path.name} is in this file "
            f"(e.g. {used[0]!r} there, {theirs[0] if theirs else None!r} here): a file of another "
            "dataset, or the ids are written differently"
        )
    shown = ", ".join(repr(v) for v in missing.head(3))
    return (
        f"{path}: column {key}: {missing.len():,} of the {n_used:,} ids in {interactions_path.name} "
        f"are missing here (e.g. {shown}; {unmatched.height:,} interactions): {consequence}"
    )
