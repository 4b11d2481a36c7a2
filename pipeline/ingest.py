"""ingest: read a raw interaction log in one of FORMATS and validate it into DATA_DIR/events.parquet.

Text goes through pyarrow's CSV parser, one block of lines at a time, never the whole file: fields come as
bytes, are typed with vectorised pyarrow kernels and appended to a staging Parquet, which
pipeline.validate then splits into events.parquet and quarantine.parquet. Lines with the wrong number of
fields reach the parser's invalid-row handler with their text (rule column_count); lines that are not UTF-8
get rule utf8_text. A record is one line, so a quoted value cannot span lines: a line that leaves a double
quote open gets rule unbalanced_quote, and each line the quote ran on into is read as a record of its own.
`row` is the physical line number (1-based, header included), so every message points into the file, and the
quarantine's `raw` is that line as it is in the file (a byte that is not UTF-8 shows as \\xNN), read back once
validate has decided, from the blocks that hold quarantined lines only; a Parquet source has no lines, its `raw`
is the row's values. Text is UTF-8; a file that starts with a UTF-16 or UTF-32 byte order mark is decoded as it
is read, one without the mark is refused with the iconv command that converts it. Counts always add up:
rows_in = rows_kept + rows_quarantined + rows_filtered, where rows_filtered are rows dropped on purpose by
--behaviors (0 without it). A behavior asked for that no row has is likely a typo, or a rare behavior absent from
this file: taobao, whose behaviors are known, refuses an unknown one up front; otherwise it is a warning and the
summary's behaviors_unmatched, beside behaviors_seen (each behavior's rows), and an error only when no row at all
matched. For `sequences` a row is one event (one item of a line) and a line without items is one quarantined row.

A timestamp is Unix seconds (an integer or a decimal) or an ISO 8601 datetime, and events hold it as whole seconds
(int64, the unit the suite's bounds are in). A fraction of a second is dropped (floor) and counted in the summary's
timestamps_truncated: events of a user within one second then keep the order of their lines (prepare breaks ties
by line, so a file sorted by time loses no order), and two otherwise equal events in one second are duplicates.
A number is seconds whatever its size, since a unit guessed from the digits could shift a file without a word:
milli-, micro- and nanoseconds since 1970 (13, 16, 19 digits) are beyond now + 1 day and break timestamp_in_range,
shown exactly; a number no int64 holds (20 digits, 1e30) breaks it too, set by ingest, which cannot stage it, as
does a datetime that pandas cannot hold in nanoseconds (before 1677-09-21 or after 2262-04-11, e.g. 9999-12-31).

A file that cannot be read at all (missing, empty or only white space, binary, no valid line, no header column
for a role) raises PipelineError naming the file, the line and the layout expected, and the format to use when the
first line has the layout of another (RECOGNISED_FIRST_LINES). Outputs are renamed into place at the end, so a
failure leaves no partial file behind; but when every row is quarantined, ingest writes both files and then fails,
so that quarantine.parquet shows why.
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
import numbers
import os
import re
import time
import uuid
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.validate import STAGING_SCHEMA, validate

log = logging.getLogger(__name__)

FORMATS = ("movielens", "recbole", "csv", "taobao", "sequences")
COLUMN_OPTIONS = ("user_col", "item_col", "time_col", "rating_col", "behavior_col")
OPTIONAL_COLUMNS = ("rating_col", "behavior_col")
FORMAT_OPTIONS = {  # beyond rating_min / rating_max, which every format takes
    "movielens": (),
    "recbole": COLUMN_OPTIONS + ("behaviors",),
    "csv": COLUMN_OPTIONS + ("delimiter", "behaviors"),
    "taobao": ("behaviors",),
    "sequences": (),
}
# Header names used when no *_col option is given; rating and behavior are optional.
DEFAULT_COLUMNS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp",
                   "rating_col": "rating", "behavior_col": "behavior"}
MOVIELENS_CSV_COLUMNS = {"user_col": "userId", "item_col": "movieId", "time_col": "timestamp", "rating_col": "rating"}
ROLES = {"user_col": "user id", "item_col": "item id", "time_col": "timestamp"}  # the columns every format needs
TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")  # UserBehavior.csv's, the only ones it has
BEHAVIORS_SEEN_MAX = 1000  # distinct behaviors tallied for the summary; more means it is not a behavior column
# First lines that show which format a file is in, to suggest it when another was asked for: (format, pattern,
# what the line is). Only layouts unlikely to be anything else: integers, RecBole's typed names, taobao's behaviors.
RECOGNISED_FIRST_LINES = (
    ("movielens", r".*::.*", "a line of MovieLens' ratings.dat (user::item::rating::timestamp)"),
    ("movielens", r"[0-9]+(\t[0-9]+){3}", "a line of MovieLens' u.data (user<TAB>item<TAB>rating<TAB>timestamp)"),
    ("recbole", r"[^\t:]+:(token|token_seq|float|float_seq)(\t[^\t:]+:(token|token_seq|float|float_seq))*",
     "a RecBole .inter header (name:type, separated by tabs)"),
    ("taobao", rf"[0-9]+,[0-9]+,[0-9]+,({'|'.join(TAOBAO_BEHAVIORS)}),[0-9]+",
     "a line of Taobao's UserBehavior.csv (user,item,category,behavior,timestamp)"),
    ("sequences", r" *[0-9]+( +[0-9]+)+ *", "a line of item sequences (a user id, then item ids, separated by spaces)"),
)
NUMERIC_ID_FORMATS = ("movielens", "taobao")
HEAD_BYTES = 64 << 10
BLOCK_BYTES = 16 << 20  # the read unit, and so about the longest line ingest can take
LINE_DELIMITER = "\x1f"  # reads `sequences` lines whole: pyarrow refuses NUL, and no text log holds 0x1f
SPACE = " \t\r"
# A byte order mark names its encoding; UTF-32LE's starts with UTF-16LE's, so it is looked for first.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
INT_PATTERN = r"^-?[0-9]{1,18}$"  # what int64 holds whatever the digits; pyarrow's cast to int takes no "+"
LONG_INT_PATTERN = r"^-?[0-9]{19}$"  # what int64 holds up to INT64_MAX: nanoseconds since 1970 until 2262
INT64_MAX = str(2 ** 63 - 1)
FLOAT_PATTERN = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
# the details of a timestamp ingest cannot stage, around its text: a number that no int64 holds (the suite's
# timestamp_in_range says the same of the numbers it sees) and a datetime that int64 nanoseconds do not
BEYOND_ANY_DATE = ("timestamp must be Unix seconds (1970-01-01 .. now + 1 day), not milli-, micro- or nanoseconds, "
                   "which ingest does not convert; got '", "', beyond any date")
BEYOND_NS_DATES = ("timestamp must be a datetime in 1970-01-01 .. now + 1 day; got '", "'")
NS_YEARS = (1678, 2261)  # the whole years int64 nanoseconds since 1970 hold (1677-09-21 .. 2262-04-11)
NS_SECONDS = 2 ** 63 // 10 ** 9  # the seconds they hold are fewer, either way


@dataclass(frozen=True)
class Layout:
    """The fields of one line of a delimited format and which of them hold the event's values."""
    delimiter: str  # one character: MovieLens' "::" is read as ":" with empty fields in between
    names: tuple[str, ...]  # every field of a line, in order
    user: str
    item: str
    time: str
    rating: str | None = None
    behavior: str | None = None
    gaps: tuple[str, ...] = ()  # fields that must be empty (the middle of "::")
    header: bool = False
    quoted: bool = False  # RFC 4180 double quotes (csv only; the other formats never quote)
    shown: str = ""  # the layout as people know it, for messages

    def describe(self) -> str:
        return self.shown or ("<TAB>" if self.delimiter == "\t" else self.delimiter).join(self.names)


TAOBAO = Layout(",", ("user", "item", "category", "behavior", "timestamp"), "user", "item", "timestamp",
                behavior="behavior")
MOVIELENS_DAT = Layout(":", ("user", "gap1", "item", "gap2", "rating", "gap3", "timestamp"), "user", "item",
                       "timestamp", rating="rating", gaps=("gap1", "gap2", "gap3"), shown="user::item::rating::timestamp")
MOVIELENS_UDATA = Layout("\t", ("user", "item", "rating", "timestamp"), "user", "item", "timestamp", rating="rating")


class _Utf8Of(io.RawIOBase):
    """A UTF-16 or UTF-32 file read as UTF-8, the one encoding the parser takes; the decoder drops the byte order
    mark. Text that is not valid in the encoding stops the ingest: decoding it anyway would make up characters."""

    def __init__(self, path: Path, encoding: str):
        super().__init__()
        self.path, self.encoding, self.file = path, encoding, path.open("rb")
        self.decoder, self.pending, self.decoded = codecs.getincrementaldecoder(encoding)(), b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            data = self.file.read(len(buffer))
            try:
                self.pending = self.decoder.decode(data, final=not data).encode()
            except UnicodeDecodeError as err:  # err.object: the bytes decoded, some left over from the last read
                at = self.decoded + len(data) - len(err.object) + err.start
                raise PipelineError(f"{self.path}: not valid {self.encoding} text at byte {at} "
                                    f"({err.reason})") from None
            self.decoded += len(data)
            if not data:
                break
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size

    def close(self) -> None:
        self.file.close()
        super().close()


def _open(path: Path) -> BinaryIO:
    """The file as UTF-8 bytes: one that starts with a UTF-16 or UTF-32 byte order mark (Excel's "Unicode text",
    many Windows tools) is decoded as it is read. Only these marks are trusted: without one, guessing an encoding
    could read a log as the wrong text without a word."""
    with path.open("rb") as f:
        start = f.read(4)
    encoding = next((name for mark, name in BYTE_ORDER_MARKS if start.startswith(mark)), None)
    return path.open("rb") if encoding is None else io.BufferedReader(_Utf8Of(path, encoding))


def _head(path: Path) -> bytes:
    with _open(path) as f:
        return f.read(HEAD_BYTES)


def _unmarked_utf(head: bytes) -> str | None:
    """The UTF-16 or UTF-32 variant that a head holding NUL bytes reads as, without NULs and with a line break: text
    written without a byte order mark (in ASCII text every other byte, or three in four, is NUL)."""
    for encoding in ("UTF-32LE", "UTF-32BE", "UTF-16LE", "UTF-16BE"):
        try:
            text = codecs.getincrementaldecoder(encoding)().decode(head)  # not final: the head may cut a character
        except UnicodeDecodeError:
            continue
        if "\x00" not in text and "\n" in text:
            return encoding
    return None


def _first_line(path: Path, expected: str) -> str:
    line = _head(path).split(b"\n", 1)[0].split(b"\r", 1)[0]
    try:
        return line.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise PipelineError(f"{path}:1: not UTF-8 text; expected {expected}") from None


def _blank(path: Path, head: bytes) -> bool:
    """Whether the file holds nothing but white space after a byte order mark: no record, as in an empty file."""
    if head.removeprefix(codecs.BOM_UTF8).strip():
        return False
    with _open(path) as f:  # rare: a head of white space only, so read on
        f.read(len(head))
        while chunk := f.read(BLOCK_BYTES):
            if chunk.strip():
                return False
    return True


def _format_hint(path: Path, fmt: str) -> tuple[str, str] | None:
    """(format, what its first line is) when the file's first line has the layout of a format other than `fmt`."""
    try:
        line = _first_line(path, "")
    except PipelineError:  # not UTF-8, so no format's layout
        return None
    return next(((other, what) for other, pattern, what in RECOGNISED_FIRST_LINES
                 if other != fmt and re.fullmatch(pattern, line)), None)


def _resolve(source: Path, fmt: str) -> Path:
    """The file to read: it exists, holds more than white space and, unless Parquet, is not binary."""
    path = Path(source).expanduser()
    if path.is_dir():
        wanted = {"movielens": ("ratings.dat", "ratings.csv", "u.data"), "recbole": ("*.inter",)}.get(fmt, ())
        found = [p for pattern in wanted for p in sorted(path.glob(pattern))]  # in order of preference
        if not found or (fmt == "recbole" and len(found) > 1):
            raise PipelineError(f"{path}: is a folder; pass the {fmt} file itself"
                                + (f" (looked for {', '.join(wanted)}, found {len(found)})" if wanted else ""))
        path = found[0]
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (format {fmt})")
    head = _head(path)
    if _blank(path, head):
        kind = " (only white space or a byte order mark)" if path.stat().st_size else ""
        raise PipelineError(f"{path}:1: file is empty{kind}; expected {fmt} records")
    if not (fmt == "csv" and head.startswith(b"PAR1")) and b"\x00" in head:
        encoding = _unmarked_utf(head)
        if encoding:
            raise PipelineError(f"{path}:1: {encoding} text without a byte order mark; ingest reads UTF-8 (and UTF-16 "
                                f"or UTF-32 that starts with its mark): convert it first, e.g. iconv -f {encoding} "
                                f"-t UTF-8 {path} > {path.with_suffix('')}.utf8{path.suffix}")
        line = head[:head.index(b"\x00")].count(b"\n") + 1
        raise PipelineError(f"{path}:{line}: binary data (a NUL byte); expected a {fmt} text file "
                            "(decompress archives first)")
    return path


def _header_layout(path: Path, fmt: str, options: dict, defaults: dict, delimiter: str) -> Layout:
    """Map the *_col options (or their defaults) to header names; RecBole names carry a `:type` suffix."""
    line = _first_line(path, f"a header line naming {defaults['user_col']}, {defaults['item_col']}, ...")
    names = [n.strip() for n in next(csv.reader([line], delimiter=delimiter))]
    keys = [n.split(":", 1)[0] for n in names] if fmt == "recbole" else names
    given = {options.get(o) for o in defaults} - {None}
    chosen = {}
    for option, default in defaults.items():
        name = options.get(option)
        if name is None and option in OPTIONAL_COLUMNS:
            # an optional column's default name is only a guess: it gives way to a column an option names
            chosen[option] = names[keys.index(default)] if default in keys and default not in given else None
        elif (name or default) in keys:
            chosen[option] = names[keys.index(name or default)]
        else:
            raise _missing_column(path, fmt, option, name, default, keys)
    if len(set(names)) < len(names):
        raise PipelineError(f"{path}:1: the header repeats a column name ({', '.join(names)})")
    _check_roles(f"{path}:1", chosen, options)
    return Layout(delimiter, tuple(names), chosen["user_col"], chosen["item_col"], chosen["time_col"],
                  chosen["rating_col"], chosen.get("behavior_col"), header=True, quoted=fmt == "csv")


def _missing_column(path: Path, fmt: str, option: str, name: str | None, default: str,
                    keys: list[str]) -> PipelineError:
    """The error for a header without a needed column: the format the file seems to be in, when its first line
    shows one; else the column looked for, blaming the option only when the user gave it."""
    hint = _format_hint(path, fmt)
    if hint:
        return PipelineError(f"{path}:1: this looks like {hint[1]}, not a {fmt} header: use --format {hint[0]}")
    columns = f"(columns: {', '.join(keys)})"
    if name is not None:
        return PipelineError(f"{path}:1: the header has no column {name!r} for {_flag(option)} {columns}")
    rename = f"; if it is called otherwise, name it with {_flag(option)}" if option in FORMAT_OPTIONS[fmt] else ""
    return PipelineError(f"{path}:1: the header has no column {default!r} for the {ROLES[option]}{rename} {columns}")


def _flag(option: str) -> str:
    return f"--{option.replace('_', '-')}"


def _check_roles(where: str, chosen: dict, options: dict) -> None:
    """One column per role: the user column read as the item too would make every item its own user."""
    for name in dict.fromkeys(n for n in chosen.values() if n is not None):
        roles = [_flag(o) + ("" if options.get(o) else " (by default)") for o, n in chosen.items() if n == name]
        if len(roles) > 1:
            raise PipelineError(f"{where}: column {name!r} is mapped to {' and '.join(roles)}; each role needs a "
                                "column of its own")


def _delimiter(path: Path, delimiter: str | None) -> str:
    if delimiter is not None:
        delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter.lower(), delimiter)
        if len(delimiter) != 1 or delimiter in "\"\r\n":
            raise PipelineError(f"--delimiter must be one character other than a quote or newline, got {delimiter!r}")
        return delimiter
    if path.suffix.lower() in (".tsv", ".tab", ".inter"):
        return "\t"
    line = _first_line(path, "a header line")
    return max(",\t;|", key=line.count)


def _layout(path: Path, fmt: str, options: dict) -> Layout:
    if fmt == "taobao":
        return TAOBAO
    if fmt == "recbole":
        return _header_layout(path, fmt, options, DEFAULT_COLUMNS, "\t")
    if fmt == "csv":
        return _header_layout(path, fmt, options, DEFAULT_COLUMNS, _delimiter(path, options.get("delimiter")))
    # movielens: ratings.dat (ml-1m, ml-10m), ratings.csv (ml-latest) or u.data (ml-100k)
    line = _first_line(path, MOVIELENS_DAT.describe())
    if "::" in line:
        return MOVIELENS_DAT
    if line.startswith("userId"):
        return _header_layout(path, fmt, {}, MOVIELENS_CSV_COLUMNS, ",")
    return MOVIELENS_UDATA


def _text(column: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """Bytes -> UTF-8 strings (a byte that is not UTF-8 shows as \\xNN), plus a mask of the rows that were not valid
    UTF-8 (None when all were)."""
    try:
        return column.cast(pa.string()), None
    except pa.ArrowInvalid:  # rare: decode row by row and flag the bad ones
        values = column.to_pylist()
        bad = [not _is_utf8(v) for v in values]
        return pa.array([v.decode("utf-8", "backslashreplace") for v in values], pa.string()), pa.array(bad)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _field(text: pa.Array) -> pa.Array:
    """Trimmed text; empty is null."""
    text = pc.utf8_trim(text, characters=SPACE)
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _parse_timestamp(text: pa.Array) -> tuple[pa.Array, pa.Array | None, int]:
    """Unix seconds (integer or decimal, as RecBole's timestamp:float) or an ISO 8601 datetime (UTC unless it has
    an offset), as int64 seconds; null where the text is missing or none of these. A number is seconds whatever its
    size: a unit guessed from the digits could shift a whole file without a word. A fraction of a second is dropped
    (floor), since events hold whole seconds. Also returns, for the rows that are a number no int64 holds or a
    datetime beyond int64 nanoseconds (null too), the detail saying that they are out of range (None when there are
    none), and how many timestamps lost a fraction."""
    is_int = pc.fill_null(pc.match_substring_regex(text, INT_PATTERN), False)
    if pc.all(is_int).as_py():
        return pc.cast(text, pa.int64()), None, 0
    out = pc.cast(pc.if_else(is_int, text, pa.scalar(None, pa.string())), pa.int64())
    is_float = pc.and_not(pc.fill_null(pc.match_substring_regex(text, FLOAT_PATTERN), False), is_int)
    number = pc.cast(pc.if_else(is_float, text, pa.scalar(None, pa.string())), pa.float64())
    if pc.any(pc.greater_equal(pc.abs(number), 2.0 ** 53)).as_py():  # where a float stops holding every integer
        # 19 digits up to INT64_MAX are read exactly, as integers (text of one length compares as its value)
        long = pc.fill_null(pc.and_(pc.match_substring_regex(text, LONG_INT_PATTERN),
                                    pc.less_equal(pc.utf8_ltrim(text, characters="-"), INT64_MAX)), False)
        out = pc.coalesce(out, pc.cast(pc.if_else(long, text, pa.scalar(None, pa.string())), pa.int64()))
        number = pc.if_else(long, pa.scalar(None, pa.float64()), number)
    whole = pc.floor(number)
    beyond = pc.fill_null(pc.greater_equal(pc.abs(whole), 2.0 ** 63), False)
    seconds = pc.if_else(beyond, pa.scalar(None, pa.float64()), whole)
    truncated = pc.sum(pc.not_equal(seconds, number)).as_py() or 0
    out = pc.coalesce(out, pc.cast(seconds, pa.int64()))
    rest = pc.and_not(pc.and_(pc.is_null(out), pc.is_valid(text)), beyond)
    beyond_dates = pa.array(np.zeros(len(text), dtype=bool))
    if pc.any(rest).as_py():  # datetimes: pandas parses every ISO 8601 variant
        texts = text.filter(rest).to_pandas()
        stamps = pd.to_datetime(texts, format="ISO8601", utc=True, errors="coerce")
        seconds = stamps.to_numpy(dtype="datetime64[s]").astype(np.int64)
        # a datetime beyond int64 nanoseconds is out of range, not unparsable: pandas 2 reads none, pandas 3 those of
        # a block that needs no nanoseconds, so each is judged here whatever its neighbours; NaT is int64's minimum,
        # so every text pandas did not read is looked at too
        unsure = (seconds <= -NS_SECONDS) | (seconds >= NS_SECONDS)
        beyond_ns = np.zeros(len(texts), dtype=bool)
        beyond_ns[unsure] = _beyond_ns(texts[unsure])
        stamps[beyond_ns] = pd.NaT
        missing = stamps.isna().to_numpy()
        truncated += int((stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64) % 10 ** 9 != 0)[~missing].sum())
        out = pc.replace_with_mask(out, rest, pa.array(seconds, mask=missing))
        beyond_dates = pc.replace_with_mask(beyond_dates, rest, pa.array(beyond_ns))
    if not (pc.any(beyond).as_py() or pc.any(beyond_dates).as_py()):
        return out, None, truncated
    details = pc.coalesce(_around(BEYOND_ANY_DATE, text, beyond), _around(BEYOND_NS_DATES, text, beyond_dates))
    return out, details, truncated


def _beyond_ns(texts: pd.Series) -> np.ndarray:
    """Whether each text is an ISO 8601 datetime, as pandas reads them, in a year outside NS_YEARS: moved to a year
    that pandas holds and that has as many days in February, it parses."""
    year = pd.to_numeric(texts.str.extract(r"^([0-9]{4})", expand=False), errors="coerce")
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    moved = pd.to_datetime(np.where(leap, "2000", "2001") + texts.str.slice(4), format="ISO8601", utc=True,
                           errors="coerce")
    return (year.notna() & ~year.between(*NS_YEARS)).to_numpy(dtype=bool) & moved.notna().to_numpy()


def _around(parts: tuple[str, str], text: pa.Array, where: pa.Array) -> pa.Array:
    """parts[0] + text + parts[1] where `where`, else null."""
    return pc.if_else(where, pc.binary_join_element_wise(parts[0], text, parts[1], ""), pa.scalar(None, pa.string()))


def _parse_rating(text: pa.Array) -> pa.Array:
    """float64; null where absent, NaN where present but not a number (rating_in_range then rejects it)."""
    is_number = pc.fill_null(pc.match_substring_regex(text, FLOAT_PATTERN), True)
    return pc.if_else(is_number, pc.cast(pc.if_else(is_number, text, pa.scalar(None, pa.string())), pa.float64()),
                      float("nan"))


def _staging_batch(row, user, item, timestamp, rating=None, behavior=None, raw=None, rule=None,
                   detail=None) -> pa.RecordBatch:
    n = len(row)
    columns = [row, user, item, timestamp, rating, behavior, raw, rule, detail]
    return pa.record_batch([pa.nulls(n, f.type) if c is None else c for c, f in zip(columns, STAGING_SCHEMA)],
                           schema=STAGING_SCHEMA)


def _structural(bad: list[tuple[int, str, str]]) -> pa.RecordBatch:
    """Staging rows for lines rejected before typing: (line number, rule, detail)."""
    rows, rules, details = zip(*bad)
    return _staging_batch(pa.array(rows, pa.int64()), None, None, None, rule=pa.array(rules, pa.string()),
                          detail=pa.array(details, pa.string()))


def _line_breaks(data: bytes) -> int:
    """Line breaks as pyarrow counts them: "\\n", "\\r" and "\\r\\n" each end a line."""
    if b"\r" not in data:
        return data.count(b"\n")
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _breaks_in(values: pa.ChunkedArray) -> np.ndarray:
    """The line breaks inside each value (bytes), counted as _line_breaks counts them."""
    n, r, rn = (pc.count_substring(values, s).to_numpy() for s in ("\n", "\r", "\r\n"))
    return (n + r - rn).astype(np.int64)


def _blocks(path: Path) -> Iterator[bytes]:
    """The file in blocks of about BLOCK_BYTES that end with a line break, to be parsed one by one: a quote left
    open swallows lines of its own block at most."""
    rest = b""
    with _open(path) as f:
        while chunk := f.read(BLOCK_BYTES):
            # cut after the chunk's last line break; a "\r" that ends it may be the first half of a "\r\n"
            cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r", 0, len(chunk) - 1)) + 1
            if cut:
                yield b"".join((rest, memoryview(chunk)[:cut]))  # one copy of the block
                rest = chunk[cut:]
            elif len(rest) + len(chunk) > BLOCK_BYTES:
                raise pa.ArrowInvalid(f"a line is longer than {BLOCK_BYTES} bytes")
            else:
                rest += chunk
    if rest:
        yield rest + b"\n"  # so that a quote the last line leaves open swallows a line break, which shows


class _Parser:
    """Rows of a delimited text, as fields of bytes, with the line of each; a record is one line."""

    def __init__(self, names: tuple[str, ...], delimiter: str, quoted: bool, wrong_count: Callable[[int], str]):
        self.names, self.delimiter, self.quoted, self.wrong_count = names, delimiter, quoted, wrong_count

    def parse(self, text: bytes, skip: int) -> tuple[pa.Table, np.ndarray, list, int]:
        """The rows of `text` after `skip` header lines: their fields, their lines (0-based), the lines rejected as
        (line, rule, detail), and how many lines `text` has. A line with another number of fields breaks
        column_count (detail from `wrong_count`, given the number found), one that leaves a quote open breaks
        unbalanced_quote."""
        table, rejected = self._csv(text, skip)
        total = skip + table.num_rows + len(rejected)
        accepted = np.arange(total + 1) > skip
        accepted[[r.number for r in rejected]] = False
        accepted = np.flatnonzero(accepted)
        # a row is one line, plus the line breaks it swallowed through a quote it left open
        lines, breaks = total, np.zeros(total + 1, dtype=np.int64)
        if self.quoted and b'"' in text:
            lines = _line_breaks(text)
            breaks = self._breaks(text, lines, table, rejected, accepted, skip)
        # pyarrow numbers rows, not lines (header included): row r starts on line r - 1, plus the breaks
        # swallowed by the rows before it
        start = np.arange(-1, total) + np.cumsum(breaks) - breaks
        bad = [(int(start[r.number]), "column_count", self.wrong_count(r.actual_columns))
               for r in rejected if not breaks[r.number]]
        if not breaks.any():
            return table, start[accepted], bad, lines
        table, rows, unbalanced = self._reparse(text, table, start, accepted, breaks)
        return table, rows, bad + unbalanced, lines

    def _csv(self, text: bytes, skip: int) -> tuple[pa.Table, list]:
        """pyarrow's parse of `text`: the rows it accepts, and those it rejects (number, text, actual_columns)."""
        rejected = []

        def on_invalid(row) -> str:
            rejected.append(row)
            return "skip"

        table = pacsv.read_csv(
            pa.BufferReader(text),
            # one thread: the invalid-row handler only learns row numbers when rows are parsed in order
            read_options=pacsv.ReadOptions(column_names=list(self.names), skip_rows=skip, block_size=len(text) + 1,
                                           use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, quote_char='"' if self.quoted else False,
                                             escape_char=False, newlines_in_values=False, ignore_empty_lines=False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in self.names},
                                                 strings_can_be_null=False))
        return table, rejected

    def _breaks(self, text: bytes, lines: int, table: pa.Table, rejected: list, accepted: np.ndarray,
                skip: int) -> np.ndarray:
        """The line breaks that each row (index: row number) swallowed through a quote it left open, as pyarrow
        reads on (newlines_in_values=False is only a speed hint). Swallowed breaks leave fewer rows than lines,
        but for the last break: a rejected row's text leaves that one out, so the last line is checked."""
        total = skip + table.num_rows + len(rejected)
        breaks = np.zeros(total + 1, dtype=np.int64)
        if total != lines:
            breaks[accepted] = sum(_breaks_in(c) for c in table.columns)
            breaks[[r.number for r in rejected]] = [_line_breaks(r.text.encode()) for r in rejected]
        if total > skip and self._open_at_end(text):
            breaks[total] = max(breaks[total], 1)
        return breaks

    def _open_at_end(self, text: bytes) -> bool:
        """Whether the last line of `text` leaves a quote open, which would swallow a line after it."""
        end = len(text) - (2 if text.endswith(b"\r\n") else 1)
        last = text[max(text.rfind(b"\n", 0, end), text.rfind(b"\r", 0, end)) + 1:]
        if b'"' not in last:
            return False
        table, rejected = self._csv(last + b"\r", 0)  # a blank line after it ("\n" would pair with a "\r")
        return table.num_rows + len(rejected) < 2

    def _reparse(self, text: bytes, table: pa.Table, start: np.ndarray, accepted: np.ndarray,
                 breaks: np.ndarray) -> tuple[pa.Table, np.ndarray, list]:
        """The rows, and the lines rejected, once the quotes left open are closed at their line: the line that
        opened one is rejected, and the lines it swallowed are parsed again, all of them together."""
        lines = text.splitlines(keepends=True)
        opened = start[breaks > 0]
        bad = [(int(at), "unbalanced_quote",
                "a double quote opens a value that the line does not close (a value cannot span lines)")
               for at in opened]
        # the lines after each opening one, as many as its row swallowed (its last break may be the text's end)
        swallowed = np.concatenate([np.arange(at + 1, min(at + 1 + n, len(lines))) for at, n in
                                    zip(opened, breaks[breaks > 0])])
        whole = breaks[accepted] == 0
        tables, rows = [table.filter(pa.array(whole))], [start[accepted][whole]]
        if len(swallowed):
            # each line ends with "\n": a "\r" that ended one would pair with a "\n" that makes the next blank
            again, again_rows, again_bad, _ = self.parse(b"".join(lines[at].rstrip(b"\r\n") + b"\n"
                                                                  for at in swallowed), 0)
            tables.append(again)
            rows.append(swallowed[again_rows])
            bad += [(int(swallowed[at]), *rest) for at, *rest in again_bad]
        rows = np.concatenate(rows)
        order = np.argsort(rows, kind="stable")
        return pa.concat_tables(tables).take(order), rows[order], bad


def _read(path: Path, names: tuple[str, ...], skip: int, delimiter: str, quoted: bool, bad: list,
          wrong_count: Callable[[int], str], blocks: list) -> Iterator[tuple[pa.RecordBatch, pa.Array]]:
    """Batches of every field as bytes (UTF-8 is checked per row later), with each row's line number (1-based,
    header included); rejected lines go to `bad` (see _Parser.parse), the first line and byte offset of each block
    to `blocks` (see _SourceLines)."""
    parser, first, offset = _Parser(names, delimiter, quoted, wrong_count), 1, 0
    for block in _blocks(path):
        blocks.append((first, offset))
        table, rows, rejected, lines = parser.parse(block, skip if first == 1 else 0)
        bad += [(first + at, *rest) for at, *rest in rejected]
        if table.num_rows:
            yield table.combine_chunks().to_batches()[0], pa.array(rows + first)
        first += lines
        offset += len(block)


def _delimited(path: Path, layout: Layout, behaviors: list[str] | None, counts: dict,
               blocks: list) -> Iterator[pa.RecordBatch]:
    """Staging batches of a delimited text file; `blocks` as in _read."""
    bad: list[tuple[int, str, str]] = []
    mapped = [n for n in (layout.user, layout.item, layout.time, layout.rating, layout.behavior) if n]
    for batch, row in _read(path, layout.names, int(layout.header), layout.delimiter, layout.quoted, bad,
                            lambda found: f"expected {len(layout.names)} fields ({layout.describe()}), found {found}",
                            blocks):
        text, checks = {}, []
        for name in dict.fromkeys(mapped + list(layout.gaps)):
            text[name], not_utf8 = _text(batch.column(name))
            if not_utf8 is not None:
                checks.append((not_utf8, "utf8_text", "line is not valid UTF-8 text"))
        # pyarrow reads a blank line as a row of empty fields, not as an invalid row
        blank = _all([pc.equal(pc.binary_length(f), 0) for f in batch.columns])
        checks.append((blank, "column_count", f"no values on the line; expected {layout.describe()}"))
        # a lone ":" where MovieLens has "::" leaves a gap field non-empty
        checks += [(pc.not_equal(text[g], ""), "column_count", f"expected {layout.describe()}") for g in layout.gaps]
        drop = pa.array(np.zeros(len(row), dtype=bool))
        for mask, rule, detail in checks:
            mask = pc.and_not(mask, drop)  # a line is reported once, under its first problem
            if pc.any(mask).as_py():
                bad += zip(row.filter(mask).to_pylist(), repeat(rule), repeat(detail))
                drop = pc.or_(drop, mask)
        if pc.any(drop).as_py():
            keep = pc.invert(drop)
            row, text = row.filter(keep), {n: t.filter(keep) for n, t in text.items()}
        if behaviors is not None:
            wanted = _wanted(_field(text[layout.behavior]), behaviors, counts)
            row, text = row.filter(wanted), {n: t.filter(wanted) for n, t in text.items()}
        yield _events(row, text, layout, counts)
        if bad:
            yield _structural(bad)
            bad.clear()
    if bad:
        yield _structural(bad)


def _wanted(behavior: pa.Array, behaviors: list[str], counts: dict) -> pa.Array:
    """Which rows have one of `behaviors`; counts the others as filtered, and tallies the rows of each behavior in
    counts["seen"] (None once it holds more than BEHAVIORS_SEEN_MAX) and the behaviors found in counts["matched"]."""
    wanted = pc.fill_null(pc.is_in(behavior, pa.array(behaviors, pa.string())), False)
    counts["filtered"] += len(behavior) - (pc.sum(wanted).as_py() or 0)
    counts["matched"].update(pc.unique(behavior.filter(wanted)).to_pylist())
    if counts["seen"] is not None:
        tally = pc.value_counts(behavior.drop_null())  # an empty field is no behavior
        for value, n in zip(tally.field("values").to_pylist(), tally.field("counts").to_pylist()):
            counts["seen"][value] = counts["seen"].get(value, 0) + n
        if len(counts["seen"]) > BEHAVIORS_SEEN_MAX:
            counts["seen"] = None
    return wanted


def _behaviors_seen(counts: dict) -> dict | None:
    """Rows of each behavior read, commonest first; None when there were too many behaviors to tally."""
    return counts["seen"] and dict(sorted(counts["seen"].items(), key=lambda item: (-item[1], item[0])))


def _show_behaviors(counts: dict) -> str:
    seen = _behaviors_seen(counts)
    if seen is None:
        return f"more than {BEHAVIORS_SEEN_MAX} different values (is that the behavior column?)"
    return ", ".join(f"{b} ({n})" for b, n in seen.items()) or "none (every behavior field is empty)"


def _all(masks: list[pa.Array]) -> pa.Array:
    out = masks[0]
    for mask in masks[1:]:
        out = pc.and_(out, mask)
    return out


def _events(row: pa.Array, text: dict, layout: Layout, counts: dict,
            shown: list[pa.Array] | None = None) -> pa.RecordBatch:
    """Typed staging rows from the text of the mapped fields; counts["truncated"] adds the timestamps that lost a
    fraction of a second. `shown`, for a source without lines to show (Parquet), are all of a row's fields as text,
    joined by commas into the raw of rows sure to be quarantined."""
    user, item, when = _field(text[layout.user]), _field(text[layout.item]), _field(text[layout.time])
    timestamp, detail, truncated = _parse_timestamp(when)
    counts["truncated"] += truncated
    rule = None
    if detail is not None:  # a timestamp ingest cannot stage cannot be checked by the suite: its rule is set here
        rule = pc.if_else(pc.is_valid(detail), "timestamp_in_range", pa.scalar(None, pa.string()))
    rating = _parse_rating(_field(text[layout.rating])) if layout.rating else None
    behavior = _field(text[layout.behavior]) if layout.behavior else None
    if shown is None:  # a text source: the quarantine shows the line itself (see _show_source_lines)
        return _staging_batch(row, user, item, timestamp, rating, behavior, rule=rule, detail=detail)
    # for rows sure to be quarantined, whose values alone would not show what was there (an empty field, text
    # that did not parse); other rejects are shown by their values
    unparsed = pc.or_(pc.or_(pc.is_null(user), pc.is_null(item)), pc.is_null(timestamp))
    if rating is not None:
        unparsed = pc.or_(unparsed, pc.fill_null(pc.is_nan(rating), False))
    raw = pc.if_else(unparsed, pc.binary_join_element_wise(*shown, ","), pa.scalar(None, pa.string())) \
        if pc.any(unparsed).as_py() else None
    return _staging_batch(row, user, item, timestamp, rating, behavior, raw, rule, detail)


def _line_starts(users: pa.Array, lengths: np.ndarray, seen: dict) -> np.ndarray:
    """How many events each line's user had before the line: on earlier lines of this batch, in line order, plus
    `seen` (user -> events on earlier batches' lines), which this updates."""
    encoded = users.dictionary_encode()
    user, names = encoded.indices.to_numpy(), encoded.dictionary.to_pylist()
    order = np.argsort(user, kind="stable")  # a user's lines together, in line order
    before = np.cumsum(lengths[order]) - lengths[order]  # events of every line before, whoever's
    first = np.r_[True, user[order][1:] != user[order][:-1]]
    before -= np.maximum.accumulate(np.where(first, before, 0))  # ... minus those before the user's first line
    starts = np.empty_like(before)
    starts[order] = before
    carried = np.array([seen.get(name, 0) for name in names], dtype=np.int64)
    for name, n in zip(names, np.bincount(user, weights=lengths, minlength=len(names)).astype(np.int64)):
        seen[name] = seen.get(name, 0) + int(n)
    return starts + carried[user]


def _sequences(path: Path, blocks: list) -> Iterator[pa.RecordBatch]:
    """Staging batches of a `user item1 item2 ...` file: one event per item, timestamp = 1-based position in the
    user's sequence; a later line of the same user continues it. `blocks` as in _read."""
    seen: dict = {}
    bad: list[tuple[int, str, str]] = []
    # only a line holding LINE_DELIMITER splits: treat it as malformed
    for batch, row in _read(path, ("line",), 0, LINE_DELIMITER, False, bad,
                            lambda found: "expected a user id and item ids separated by spaces", blocks):
        line, not_utf8 = _text(batch.column("line"))
        fields = pc.utf8_split_whitespace(pc.utf8_trim(line, characters=SPACE))
        length = pc.list_value_length(fields)
        short = pc.less(length, 2)
        if not_utf8 is not None:
            bad += zip(row.filter(not_utf8).to_pylist(), repeat("utf8_text"), repeat("line is not valid UTF-8 text"))
            short = pc.and_not(short, not_utf8)
        bad += zip(row.filter(short).to_pylist(), repeat("column_count"),
                   repeat("expected a user id and at least one item id separated by spaces"))
        keep = pc.invert(pc.or_(short, not_utf8)) if not_utf8 is not None else pc.invert(short)
        fields, row = fields.filter(keep), row.filter(keep)
        items = pc.list_slice(fields, 1)
        parent = pc.list_parent_indices(items)
        lengths = pc.list_value_length(items).to_numpy().astype(np.int64)
        line_user = _field(pc.list_element(fields, 0))
        offsets = np.repeat(items.offsets.to_numpy()[:-1] - items.offsets.to_numpy()[0]
                            - _line_starts(line_user, lengths, seen), lengths)
        position = np.arange(len(parent), dtype=np.int64) - offsets + 1
        yield _staging_batch(row.take(parent), line_user.take(parent), _field(pc.list_flatten(items)),
                             pa.array(position))
        if bad:
            yield _structural(bad)
            bad.clear()
    if bad:
        yield _structural(bad)


class _SourceLines:
    """Lines of a text source by number (1-based, as `row` counts them), read back from the blocks that hold them:
    `blocks` holds the first line and byte offset of each block, as _read recorded them, so only the blocks with an
    asked-for line are read again."""

    def __init__(self, path: Path, blocks: list[tuple[int, int]]):
        self.firsts, self.offsets = np.array([first for first, _ in blocks]), [offset for _, offset in blocks]
        self.path, self.file, self.position = path, _open(path), 0
        self.block, self.lines = -1, []

    def __enter__(self) -> _SourceLines:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def text(self, rows: np.ndarray) -> pa.Array:
        """The lines numbered `rows`, without their line breaks, as text; fastest in ascending order."""
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        block = np.searchsorted(self.firsts, ascending, side="right") - 1
        lines = []
        for index in np.unique(block):
            self._load(index)
            lines += [self.lines[at] for at in ascending[block == index] - self.firsts[index]]
        return _text(pa.array(lines, pa.binary()).take(pa.array(np.argsort(order))))[0]

    def _load(self, index: int) -> None:
        if index == self.block:
            return
        start = self.offsets[index]
        if self.file.seekable():
            self.file.seek(start)
        else:  # a decoded UTF-16 or UTF-32 file only reads on
            if self.position > start:
                self.file.close()
                self.file, self.position = _open(self.path), 0
            while self.position < start:
                self.position += len(self.file.read(min(BLOCK_BYTES, start - self.position)))
        data = self.file.read(self.offsets[index + 1] - start if index + 1 < len(self.offsets) else -1)
        self.position = start + len(data)
        lines = data.splitlines()  # as pyarrow counts lines: "\n", "\r" and "\r\n" each end one
        if start == 0 and lines:
            lines[0] = lines[0].removeprefix(codecs.BOM_UTF8)  # pyarrow skips it too: it is not the line's text
        self.block, self.lines = index, lines


def _show_source_lines(quarantine: Path, path: Path, blocks: list[tuple[int, int]]) -> None:
    """Set the quarantine's raw to each row's line as it is in the text source, so that it can be found and fixed
    there: validate only knows the values (quotes and spacing gone), and ingest stages no text, since which rows
    go to quarantine is mostly known only after validate. The lines are read back from their blocks only."""
    with pq.ParquetFile(quarantine) as rejected:
        if not rejected.metadata.num_rows:
            return
        shown = quarantine.with_name(f".quarantine-{uuid.uuid4().hex[:8]}.parquet")
        try:
            with _SourceLines(path, blocks) as lines, pq.ParquetWriter(shown, rejected.schema_arrow) as writer:
                for batch in rejected.iter_batches():
                    at = batch.schema.get_field_index("raw")
                    writer.write_batch(batch.set_column(at, batch.schema.field(at),
                                                        lines.text(batch.column("row").to_numpy())))
            os.replace(shown, quarantine)
        finally:
            shown.unlink(missing_ok=True)


def _parquet_layout(path: Path, schema: pa.Schema, options: dict) -> Layout:
    """Map the *_col options (or their defaults) to the columns of a Parquet source, whose values must have a
    text form to go through the same conversions as a text file's."""
    given = {options.get(o) for o in DEFAULT_COLUMNS} - {None}
    chosen = {}
    for option, default in DEFAULT_COLUMNS.items():
        name = options.get(option) or default
        if option in OPTIONAL_COLUMNS and not options.get(option) and (name not in schema.names or name in given):
            continue  # the default name is only a guess (see _header_layout)
        if name not in schema.names:
            raise PipelineError(f"{path}: no column {name!r} for {_flag(option)} (columns: {', '.join(schema.names)})")
        if not _has_text_form(schema.field(name).type):
            raise PipelineError(f"{path}: column {name!r} ({_flag(option)}) has type {schema.field(name).type}, "
                                "which ingest cannot read: it takes one string, number or date a row")
        chosen[option] = name
    _check_roles(str(path), chosen, options)
    return Layout(",", tuple(chosen.values()), chosen["user_col"], chosen["item_col"], chosen["time_col"],
                  chosen.get("rating_col"), chosen.get("behavior_col"))


def _has_text_form(type_: pa.DataType) -> bool:
    """Whether pyarrow can cast values of this type to text (not lists, structs or maps)."""
    try:
        pc.cast(pa.array([], type_), pa.string())
    except pa.ArrowException:
        return False
    return True


def _parquet(path: Path, options: dict, counts: dict) -> Iterator[pa.RecordBatch]:
    """Staging batches of a Parquet source: its columns go through the same text conversions."""
    try:
        source = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise PipelineError(f"{path}: not a readable Parquet file ({err})") from None
    layout = _parquet_layout(path, source.schema_arrow, options)
    if options["behaviors"] is not None and layout.behavior is None:
        raise PipelineError(f"{path}: --behaviors needs a behavior column (--behavior-col)")
    row = 1
    for batch in source.iter_batches(batch_size=1 << 20, columns=list(layout.names)):
        text = {n: pc.fill_null(pc.cast(batch.column(n), pa.string()), "") for n in layout.names}
        rows = pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64))
        row += batch.num_rows
        if options["behaviors"] is not None:
            wanted = _wanted(_field(text[layout.behavior]), options["behaviors"], counts)
            rows, text = rows.filter(wanted), {n: t.filter(wanted) for n, t in text.items()}
        yield _events(rows, text, layout, counts, shown=list(text.values()))


def _is_text(value) -> bool:
    return isinstance(value, str)


def _is_behaviors(value) -> bool:
    return isinstance(value, str) or isinstance(value, (list, tuple)) and all(isinstance(b, str) for b in value)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# What each option takes (None: its default): a DAG conf can hold any JSON value, and a wrong type would fail
# deep inside the read, as an error Airflow retries.
OPTION_FORMS = {
    **dict.fromkeys(COLUMN_OPTIONS, (_is_text, "a header name (a string)")),
    "delimiter": (_is_text, "one character (a string), e.g. \",\" or \"\\t\""),
    "behaviors": (_is_behaviors, "a list of strings or one comma-separated string, e.g. \"buy,cart\""),
    "rating_min": (_is_number, "a number"),
    "rating_max": (_is_number, "a number"),
}


def _check_options(fmt: str, options: dict) -> dict:
    allowed = FORMAT_OPTIONS[fmt] + ("rating_min", "rating_max")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PipelineError(f"option(s) {', '.join(unknown)} do not apply to format {fmt} "
                            f"(it takes: {', '.join(allowed)})")
    for name, value in options.items():
        accepts, form = OPTION_FORMS[name]
        if value is not None and not accepts(value):
            raise PipelineError(f"option {name}={value!r} of format {fmt}: expected {form}")
    low, high = options.get("rating_min"), options.get("rating_max")
    if low is not None and high is not None and low > high:
        raise PipelineError(f"--rating-min {low} is above --rating-max {high}")
    behaviors = options.get("behaviors")
    if isinstance(behaviors, str):
        behaviors = [b for b in (s.strip() for s in behaviors.split(",")) if b]
    if behaviors is not None and not behaviors:
        raise PipelineError("--behaviors needs at least one behavior, e.g. buy,cart")
    unknown = [b for b in behaviors if b not in TAOBAO_BEHAVIORS] if fmt == "taobao" and behaviors else []
    if unknown:  # a known vocabulary: a typo is certain, and would silently drop that behavior's rows
        raise PipelineError(f"--behaviors {','.join(unknown)}: not a taobao behavior; taobao's are "
                            f"{', '.join(TAOBAO_BEHAVIORS)}")
    return {**options, "behaviors": list(behaviors) if behaviors is not None else None}


def _stage(batches: Iterator[pa.RecordBatch], staging: Path, counts: dict) -> None:
    with pq.ParquetWriter(staging, STAGING_SCHEMA, compression="none") as writer, \
            tqdm(unit=" rows", unit_scale=True, desc="ingest", leave=False) as bar:
        for batch in batches:
            rule = batch.column("rule")
            if counts["first_bad"] is None and rule.null_count < len(rule):
                at = pc.index(pc.is_valid(rule), True).as_py()
                counts["first_bad"] = (batch.column("row")[at].as_py(), batch.column("detail")[at].as_py())
            counts["staged"] += batch.num_rows
            counts["well_formed"] += rule.null_count
            writer.write_batch(batch)
            bar.update(batch.num_rows)


def _check_staged(path: Path, fmt: str, expected: str, header: bool, counts: dict,
                  behaviors: list[str] | None) -> None:
    """Fail before validating when no staged row can become an event: no row has any of --behaviors (checked
    first: a typo there must not be blamed on the odd malformed line), there were no data rows, or no line was
    well formed."""
    if counts["well_formed"]:
        return
    if counts["filtered"]:
        malformed = f" ({counts['staged']} more would be quarantined; the first, line {counts['first_bad'][0]}: " \
                    f"{counts['first_bad'][1]})" if counts["staged"] else ""
        raise PipelineError(f"{path}: all {counts['filtered']} rows were filtered out by --behaviors "
                            f"{','.join(behaviors)}, which no row has; the file's behaviors: "
                            f"{_show_behaviors(counts)}{malformed}")
    if counts["staged"] == 0:
        raise PipelineError(f"{path}:{2 if header else 1}: no data rows; expected lines of {expected}")
    row, detail = counts["first_bad"]
    hint = _format_hint(path, fmt)
    also = f"; line 1 looks like {hint[1]}: use --format {hint[0]}" if hint else ""
    raise PipelineError(f"{path}:{row}: no line is a valid {fmt} record; the first fails with: {detail}{also}")


def _nothing_kept(path: Path, quarantine: Path, summary: dict, filtered: int) -> PipelineError:
    """The error for a source whose every row was quarantined (or filtered out): the commonest rules, and the
    first row that broke the commonest one."""
    reasons = sorted(summary["quarantine_reasons"].items(), key=lambda item: -item[1])
    row, detail = _first_quarantined(quarantine, reasons[0][0])
    also = f" ({filtered} more were filtered out by --behaviors)" if filtered else ""
    return PipelineError(
        f"{path}: no row was kept: all {summary['rows_quarantined']} rows were quarantined{also}, by rule "
        + ", ".join(f"{rule} ({n})" for rule, n in reasons[:3]) + (", ..." if len(reasons) > 3 else "")
        + f"; the first under {reasons[0][0]}, line {row}: {detail}; see {quarantine} for every row")


def _first_quarantined(quarantine: Path, rule: str) -> tuple[int, str]:
    """(line, detail) of the first quarantined row under `rule`, read a batch at a time."""
    for batch in pq.ParquetFile(quarantine).iter_batches(columns=["row", "rule", "detail"]):
        hits = pc.equal(batch.column("rule"), rule)
        if pc.any(hits).as_py():
            at = pc.index(hits, True).as_py()
            return batch.column("row")[at].as_py(), batch.column("detail")[at].as_py()
    raise ValueError(f"{quarantine}: no row under rule {rule}")


def _behaviors_summary(path: Path, behaviors: list[str] | None, counts: dict) -> dict:
    """behaviors_seen and behaviors_unmatched, with a warning naming the unmatched. Not an error: a nightly run
    that keeps a rare behavior must not fail on a day without it; with no behavior matched, _check_staged fails."""
    if behaviors is None:
        return {}
    unmatched = [b for b in behaviors if b not in counts["matched"]]
    if unmatched:
        log.warning("%s: --behaviors %s matched no row; the file's behaviors: %s", path, ",".join(unmatched),
                    _show_behaviors(counts))
    return {"behaviors_seen": _behaviors_seen(counts), "behaviors_unmatched": unmatched}


def ingest(source: Path | None, fmt: str, data_dir: Path, **format_options) -> dict:
    """Read `source` (None: generate the synthetic log into DATA_DIR/raw and read it as csv) in format `fmt`.

    Writes DATA_DIR/events.parquet and DATA_DIR/quarantine.parquet and returns the summary: rows_in,
    rows_kept, rows_quarantined, rows_filtered, quarantine_reasons, output, with --behaviors behaviors_seen and
    behaviors_unmatched, and more. format_options:
    user_col, item_col, time_col, rating_col, behavior_col (header names, csv and recbole), delimiter (csv),
    behaviors (list or comma-separated; csv, recbole, taobao), rating_min and rating_max (default 0..10).
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    if fmt not in FORMATS:
        raise PipelineError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    options = _check_options(fmt, format_options)
    if source is None:
        if fmt != "csv":
            raise PipelineError(f"without a SOURCE ingest generates the synthetic csv log; got --format {fmt}")
        from pipeline.synthetic import write_synthetic_log

        source = write_synthetic_log(data_dir / "raw" / "synthetic.csv")
    path = _resolve(Path(source), fmt)
    counts = {"staged": 0, "filtered": 0, "well_formed": 0, "first_bad": None, "seen": {}, "matched": set(),
              "truncated": 0}
    blocks: list[tuple[int, int]] = []  # of a text source, to show quarantined lines (see _SourceLines)
    if fmt == "csv" and _head(path).startswith(b"PAR1"):
        expected, header = "a Parquet file", False
        batches = _parquet(path, options, counts)
    elif fmt == "sequences":
        expected, header = "user item1 item2 ... separated by spaces", False
        batches = _sequences(path, blocks)
    else:
        layout = _layout(path, fmt, options)
        if options["behaviors"] is not None and layout.behavior is None:
            raise PipelineError(f"{path}: --behaviors needs a behavior column (--behavior-col)")
        expected, header = layout.describe(), layout.header
        batches = _delimited(path, layout, options["behaviors"], counts, blocks)

    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".staging-{uuid.uuid4().hex[:8]}.parquet"
    try:
        try:
            _stage(batches, staging, counts)
        except pa.ArrowInvalid as err:
            raise PipelineError(f"{path}: cannot be read as {fmt} ({err}); expected {expected}") from None
        _check_staged(path, fmt, expected, header, counts, options["behaviors"])
        summary = validate(staging, data_dir, source=str(path),
                           id_kind="numeric" if fmt in NUMERIC_ID_FORMATS else "token",
                           rating_min=options.get("rating_min"), rating_max=options.get("rating_max"))
    finally:
        staging.unlink(missing_ok=True)
    if blocks:
        _show_source_lines(data_dir / "quarantine.parquet", path, blocks)
    behaviors = _behaviors_summary(path, options["behaviors"], counts)
    if summary["rows_kept"] == 0:
        raise _nothing_kept(path, data_dir / "quarantine.parquet", summary, counts["filtered"])
    rows_in = summary["rows_in"] + counts["filtered"]
    return {
        "format": fmt,
        "source": str(path),
        "rows_in": rows_in,
        "rows_kept": summary["rows_kept"],
        "rows_quarantined": summary["rows_quarantined"],
        "rows_filtered": counts["filtered"],
        "counts": f"rows_in {rows_in} = rows_kept {summary['rows_kept']} + rows_quarantined "
                  f"{summary['rows_quarantined']} + rows_filtered {counts['filtered']}",
        "quarantine_reasons": summary["quarantine_reasons"],
        "timestamps_truncated": counts["truncated"],
        "output": summary["output"],
        "quarantine": str(data_dir / "quarantine.parquet"),
        **behaviors,
        "seconds": round(time.perf_counter() - started, 2),
    }

