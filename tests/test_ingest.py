"""ingest: every format, real logs with independently computed counts, corruption, unreadable files, the CLI."""
import codecs
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings, strategies as st
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
import pipeline.ingest
from pipeline.ingest import ingest


def write(path, text: str | bytes):
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def outputs(data_dir):
    events = pq.read_table(data_dir / "events.parquet").to_pylist()
    quarantine = {r["row"]: r for r in pq.read_table(data_dir / "quarantine.parquet").to_pylist()}
    return events, quarantine


def balanced(summary):
    return summary["rows_in"] == summary["rows_kept"] + summary["rows_quarantined"] + summary["rows_filtered"]


def test_movielens_dat_with_malformed_lines(tmp_path):
    src = write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::11::3::978300761\n2::10::4\n"
                                          "2:10::4::978300762\nx::10::4::978300763\n2::12::4::978300764\n"
                                          "3::10::abc::978300765\n")
    summary = ingest(src, "movielens", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["row"], e["user_id"], e["item_id"], e["rating"], e["timestamp"]) for e in events] == [
        (1, "1", "10", 5.0, 978300760), (2, "1", "11", 3.0, 978300761), (6, "2", "12", 4.0, 978300764)]
    assert {r: q["rule"] for r, q in quarantine.items()} == {
        3: "column_count", 4: "column_count", 5: "user_id_well_formed",  # movielens ids are numbers
        7: "rating_in_range"}  # a rating that is not a number
    assert quarantine[3]["raw"] == "2::10::4" and "user::item::rating::timestamp" in quarantine[3]["detail"]
    assert quarantine[7]["raw"] == "3::10::abc::978300765"
    assert summary["rows_in"] == 7 and balanced(summary)


def test_movielens_latest_csv_and_a_folder_source(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n")
    summary = ingest(tmp_path, "movielens", tmp_path / "d")
    events, _ = outputs(tmp_path / "d")
    assert summary["source"].endswith("ratings.csv")
    assert [(e["row"], e["item_id"], e["rating"]) for e in events] == [(2, "31", 2.5), (3, "1029", 3.0)]


def test_recbole_maps_typed_header_names_in_any_order(tmp_path):
    src = write(tmp_path / "x.inter", "timestamp:float\titem_id:token\tuser_id:token\trating:float\n"
                                      "881250949\tA\tu1\t3\n881250950.7\tB\tu1\t4\n\tC\tu2\t1\n")
    summary = ingest(src, "recbole", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["user_id"], e["item_id"], e["timestamp"]) for e in events] == [("u1", "A", 881250949),
                                                                            ("u1", "B", 881250950)]
    assert quarantine[4]["rule"] == "timestamp_parses" and balanced(summary)


def test_csv_with_options_iso_datetimes_quotes_and_crlf(tmp_path):
    src = write(tmp_path / "log.txt", 'who;what;when;kind\r\n"a;1";x;2024-01-02T03:04:05Z;view\r\n'
                                      'b;"y""z""";2024-01-02 03:04:06+01:00;buy\r\nc;w;2024-01-03;view\r\n'
                                      'd;v;2024-13-45;view\r\n')
    summary = ingest(src, "csv", tmp_path / "d", user_col="who", item_col="what", time_col="when",
                     behavior_col="kind", delimiter=";")
    events, quarantine = outputs(tmp_path / "d")
    # 2024-01-01T00:00:00Z is 1704067200; the offset +01:00 is an hour before UTC
    assert [(e["user_id"], e["item_id"], e["timestamp"], e["behavior"]) for e in events] == [
        ("a;1", "x", 1704067200 + 86400 + 3 * 3600 + 4 * 60 + 5, "view"),
        ("b", 'y"z"', 1704067200 + 86400 + 2 * 3600 + 4 * 60 + 6, "buy"),
        ("c", "w", 1704067200 + 2 * 86400, "view")]
    assert quarantine[5]["rule"] == "timestamp_parses" and "2024-13-45" in quarantine[5]["raw"]
    assert summary["rows_in"] == 4 and balanced(summary)


def test_a_numeric_timestamp_is_seconds_whatever_its_size(tmp_path):
    # ms, us and ns since 1970 are numbers out of range, not text that does not parse, and are shown as written
    stamps = {2: "1600000000", 3: "+1600000001", 4: "1600000000000", 5: "1600000000000000",
              6: "1600000000123456789", 7: "9223372036854775807", 8: "9223372036854775808",
              9: "99999999999999999999", 10: "-99999999999999999999", 11: "1e30", 12: "yesterday"}
    src = write(tmp_path / "t.csv", "user_id,item_id,timestamp\n" + "".join(f"u,i{r},{t}\n" for r, t in stamps.items()))
    summary = ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["row"], e["timestamp"]) for e in events] == [(2, 1600000000), (3, 1600000001)]
    assert {r: q["rule"] for r, q in quarantine.items()} == {**{r: "timestamp_in_range" for r in range(4, 12)},
                                                             12: "timestamp_parses"}
    for row in range(4, 8):  # numbers an int64 holds: the suite's range rule, which names the units it does not take
        assert quarantine[row]["detail"].endswith(f"not milli-, micro- or nanoseconds, which ingest does not convert; "
                                                  f"got '{stamps[row]}'")
    for row in range(8, 12):  # numbers beyond it: ingest's own detail, the same rule
        assert quarantine[row]["detail"].endswith(f"not milli-, micro- or nanoseconds, which ingest does not convert; "
                                                  f"got '{stamps[row]}', beyond any date")
    assert balanced(summary)


@pytest.mark.parametrize("neighbour", ["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.123456789Z"])
def test_an_iso_date_beyond_what_pandas_holds_is_out_of_range_not_unparsable(tmp_path, neighbour):
    # pandas holds 1677-09-21 .. 2262-04-11 in nanoseconds; pandas 3 reads dates beyond in microseconds, but only
    # where no other value of the block needs nanoseconds (the neighbour's .123456789): the verdict must not depend
    # on it
    stamps = {3: "0001-01-01T00:00:00", 4: "9999-12-31", 5: "1677-09-20T23:59:59Z", 6: "2262-04-12",
              7: "0001-01-01T00:00:00+01:00", 8: "0001-02-29", 9: "2024-02-30"}  # year 1 has no 29 February
    src = write(tmp_path / "t.csv", f"user_id,item_id,timestamp\nu,a,{neighbour}\n"
                                    + "".join(f"u,i{r},{t}\n" for r, t in stamps.items()))
    summary = ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [e["row"] for e in events] == [2]
    assert {r: q["rule"] for r, q in quarantine.items()} == {**{r: "timestamp_in_range" for r in range(3, 8)},
                                                             8: "timestamp_parses", 9: "timestamp_parses"}
    for row in range(3, 8):
        assert quarantine[row]["detail"] == ("timestamp must be a datetime in 1970-01-01 .. now + 1 day; "
                                             f"got '{stamps[row]}'")
    assert summary["timestamps_truncated"] == neighbour.count(".") and balanced(summary)


def test_a_fraction_of_a_second_is_dropped_and_counted(tmp_path):
    src = write(tmp_path / "t.csv", "user_id,item_id,timestamp\nu,a,1600000000.75\nu,b,1600000000.25\n"
                                    "u,c,1600000001.0\nu,d,2024-01-02T03:04:05.5Z\nu,e,2024-01-02T03:04:06Z\n")
    summary = ingest(src, "csv", tmp_path / "d")
    events, _ = outputs(tmp_path / "d")
    # whole seconds: a and b tie, and their lines order them
    assert [(e["item_id"], e["timestamp"]) for e in events] == [
        ("a", 1600000000), ("b", 1600000000), ("c", 1600000001), ("d", 1704164645), ("e", 1704164646)]
    assert summary["timestamps_truncated"] == 3
    assert ingest(write(tmp_path / "s.csv", "user_id,item_id,timestamp\nu,a,5\n"), "csv",
                  tmp_path / "e")["timestamps_truncated"] == 0


def test_csv_quoted_ids_keep_their_text(tmp_path):
    src = write(tmp_path / "log.csv", 'user_id,item_id,timestamp\n"a,1","y""z""",10\n"a b",z,11\n')
    ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["user_id"], e["item_id"]) for e in events] == [("a,1", 'y"z"')]
    assert quarantine[3]["rule"] == "user_id_well_formed"  # token ids hold no whitespace


def test_a_quote_left_open_quarantines_its_line_not_the_lines_after_it(tmp_path):
    lines = ["u1,i1,101", 'u1,"i2,102', "u1,i3,103", "u1,i4,104", "u1,i5,105", 'u1,i6",106', "u1,i7,107"]
    src = write(tmp_path / "q.csv", "user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    summary = ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["row"], e["item_id"]) for e in events] == [
        (2, "i1"), (4, "i3"), (5, "i4"), (6, "i5"), (7, 'i6"'), (8, "i7")]  # alone, line 7's quote is a character
    assert {r: (q["rule"], q["raw"]) for r, q in quarantine.items()} == {3: ("unbalanced_quote", 'u1,"i2,102')}
    assert "does not close" in quarantine[3]["detail"]
    assert summary["rows_in"] == len(lines) and balanced(summary)


@pytest.mark.parametrize("block_bytes", [16, 1 << 20])  # a quote open at the end of a block, or of the file
def test_a_quote_never_closed_is_one_bad_line(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(pipeline.ingest, "BLOCK_BYTES", block_bytes)
    src = write(tmp_path / "q.csv", 'user_id,item_id,timestamp\r\nu1,"never,102\r\nu1,i3,103\r\nu1,i4,"104')
    summary = ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [e["row"] for e in events] == [3]
    assert {r: q["rule"] for r, q in quarantine.items()} == {2: "unbalanced_quote", 4: "unbalanced_quote"}
    assert summary["rows_in"] == 3 and balanced(summary)


def file_lines(data: bytes) -> list[str]:
    """The file's lines as the quarantine must show them: split where pyarrow splits ("\\n", "\\r", "\\r\\n"),
    decoded, a byte that is not UTF-8 as \\xNN."""
    return [line.decode("utf-8", "backslashreplace") for line in data.splitlines()]


RAW_CASES = {  # format, file name, content, {line: rule} of the lines quarantined
    "csv": ("csv", "log.csv", b'user_id,item_id,timestamp\nu1,i1,100\n1,"3, a",abc\n"4",5,  7e\nu2,"i 2",101\n'
                              b' u1 , i1 , 100 \nu3,i3\nu4,"i4,102\n5",103\nu5,i5,1704164645\n'
                              b'u5,i5,2024-01-02T03:04:05Z\nu6,caf\xe9,104\r\n\n',
            {3: "item_id_well_formed",  # the delimiter inside quotes
             4: "timestamp_parses", 5: "item_id_well_formed",  # stray spaces; a quoted id GX rejects
             6: "duplicate_event",  # of line 2 once trimmed
             7: "column_count", 8: "unbalanced_quote", 9: "column_count",  # a quoted value run on to the next line
             11: "duplicate_event",  # the same second as line 10
             12: "utf8_text", 13: "column_count"}),  # Latin-1; a blank line
    "tsv": ("csv", "log.tsv", b'user_id\titem_id\ttimestamp\nu1\t"a\tb"\t5\n u2 \ti2\t x \nu3\ti3\t7\n',
            {2: "item_id_well_formed", 3: "timestamp_parses"}),
    "movielens": ("movielens", "ratings.dat", b"1::10::5::978300760\n2::10::4\n x::10::4::978300763\n"
                                              b"1::10::5.0::978300760\n2::11::4::978300761\n",
                  {2: "column_count", 3: "user_id_well_formed", 4: "duplicate_event"}),
    "recbole": ("recbole", "x.inter", b"user_id:token\titem_id:token\ttimestamp:float\nu1\tA\t881250949\n"
                                      b"u1\tA\t881250949.0\n\tC\t5\nu2\tB\t881250950\n",
                {3: "duplicate_event", 4: "user_id_not_null"}),
    "taobao": ("taobao", "ub.csv", b"1,100,7,pv,1511544070\n1,100,7,pv,1511544070\r\n1,101,7,buy\r\n"
                                   b"1,102,7,buy,1511544071\n",
               {2: "duplicate_event", 3: "column_count"}),
    "sequences": ("sequences", "seq.txt", b"u1 a b\nlonely\nu2  c\x01\td\nu3 caf\xe9\n",
                  {2: "column_count", 3: "item_id_well_formed", 4: "utf8_text"}),  # a control character in an id
}


@pytest.mark.parametrize("block_bytes", [40, 1 << 20])  # the lines in several blocks, or in one
@pytest.mark.parametrize("case", RAW_CASES)
def test_the_quarantine_shows_each_line_as_it_is_in_the_file(tmp_path, monkeypatch, case, block_bytes):
    monkeypatch.setattr(pipeline.ingest, "BLOCK_BYTES", block_bytes)
    fmt, name, data, rules = RAW_CASES[case]
    summary = ingest(write(tmp_path / name, data), fmt, tmp_path / "d")
    _, quarantine = outputs(tmp_path / "d")
    assert {r: q["rule"] for r, q in quarantine.items()} == rules
    lines = file_lines(data)
    assert {r: q["raw"] for r, q in quarantine.items()} == {r: lines[r - 1] for r in rules}
    assert balanced(summary)


def test_raw_keeps_quotes_spacing_and_the_bytes_that_are_not_utf8(tmp_path):
    ingest(write(tmp_path / "log.csv", RAW_CASES["csv"][2]), "csv", tmp_path / "d")
    _, quarantine = outputs(tmp_path / "d")
    assert quarantine[3]["raw"] == '1,"3, a",abc'  # not 1,3, a,abc: four fields, it seems
    assert quarantine[4]["raw"] == '"4",5,  7e'
    assert quarantine[6]["raw"] == " u1 , i1 , 100 "
    assert (quarantine[8]["raw"], quarantine[9]["raw"]) == ('u4,"i4,102', '5",103')  # each line of the record
    assert quarantine[11]["raw"] == "u5,i5,2024-01-02T03:04:05Z"  # not the values: u5,i5,1704164645
    assert quarantine[12]["raw"] == "u6,caf\\xe9,104" and "UTF-8" in quarantine[12]["detail"]


def read_lines_of(path: Path, blocks: list | None = None) -> tuple[list, list]:
    """(line, fields) of each row pipeline.ingest._read takes from a 3-field csv; (line, rule) of each it rejects."""
    bad = []
    batches = pipeline.ingest._read(path, ("a", "b", "c"), 0, ",", True, bad, str, [] if blocks is None else blocks)
    rows = [(n, tuple(r.values())) for batch, row in batches for n, r in zip(row.to_pylist(), batch.to_pylist())]
    return rows, sorted((line, rule) for line, rule, _ in bad)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.tuples(st.lists(st.sampled_from(["a", ",", '"', '""', " "]), max_size=9).map("".join),
                                st.sampled_from(["\n", "\r\n", "\r"])), min_size=1, max_size=10),
       last_break=st.booleans(), block_bytes=st.sampled_from([24, 64, 1 << 20]))  # a line fits in 24 bytes
@example(lines=[('"', "\r\n"), ('a,a,"a', "\r"), (',,"""', "\n"), ("", "\n"), ('a,a,"a', "\n")], last_break=True,
         block_bytes=1 << 20)  # lines read again together: a "\r" ending one must not pair with a blank line's "\n"
def test_a_file_reads_as_its_lines_read_one_by_one(lines, last_break, block_bytes):
    data = "".join(text + end for text, end in lines).encode()
    data = data if last_break else data.rstrip(b"\r\n")
    expected_rows, expected_bad = [], []
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(pipeline.ingest, "BLOCK_BYTES", block_bytes):
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            rows, bad = read_lines_of(write(Path(tmp) / f"{number}.csv", line))
            expected_rows += [(number, fields) for _, fields in rows]
            expected_bad += [(number, rule) for _, rule in bad]
        blocks = []
        assert read_lines_of(write(Path(tmp) / "all.csv", data), blocks) == (expected_rows, expected_bad)
        # the quarantine's raw comes from these blocks: every line number must give back that line
        numbers = np.arange(1, len(data.splitlines()) + 1)
        with pipeline.ingest._SourceLines(Path(tmp) / "all.csv", blocks) as source:
            assert source.text(numbers[::-1]).to_pylist() == [line.decode() for line in data.splitlines()][::-1]


def test_csv_tsv_is_sniffed_and_a_missing_column_is_named(tmp_path):
    src = write(tmp_path / "log.tsv", "user_id\titem_id\ttimestamp\trating\nu\ti\t5\t1\n")
    assert ingest(src, "csv", tmp_path / "d")["rows_kept"] == 1
    with pytest.raises(PipelineError, match=r"log.tsv:1: .*no column 'when' for --time-col"):
        ingest(src, "csv", tmp_path / "e", time_col="when")


def test_a_missing_column_blames_an_option_only_when_it_was_given(tmp_path):
    src = write(tmp_path / "log.csv", "who,what,when\na,b,1\n")
    with pytest.raises(PipelineError, match=r"log.csv:1: the header has no column 'user_id' for the user id; if it is "
                                            r"called otherwise, name it with --user-col \(columns: who, what, when\)$"):
        ingest(src, "csv", tmp_path / "d")
    with pytest.raises(PipelineError, match=r"log.csv:1: the header has no column 'item_id' for the item id; "):
        ingest(src, "csv", tmp_path / "d", user_col="who")
    ratings = write(tmp_path / "ratings.csv", "userId,movie,rating,timestamp\n1,2,3,4\n")
    with pytest.raises(PipelineError, match=r"ratings.csv:1: the header has no column 'movieId' for the item id "
                                            r"\(columns: userId, movie, rating, timestamp\)$"):
        ingest(ratings, "movielens", tmp_path / "d")  # which takes no --item-col


@pytest.mark.parametrize("name, content, fmt, fits", [
    ("Beauty.txt", "1 1 2 3 4 5\n2 6 7 8 9 10 4 11\n", "csv", "sequences"),
    ("x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n", "csv",
     "recbole"),
    ("ub.csv", "1,2268318,2520377,pv,1511544070\n", "csv", "taobao"),
    ("ratings.dat", "1::1193::5::978300760\n", "csv", "movielens"),
    ("u.data", "196\t242\t3\t881250949\n", "csv", "movielens"),
    ("Beauty.txt", "1 1 2 3 4 5\n", "recbole", "sequences"),
])
def test_a_header_in_another_format_names_that_format(tmp_path, name, content, fmt, fits):
    src = write(tmp_path / name, content)
    with pytest.raises(PipelineError, match=rf"^{src}:1: this looks like .*, not a {fmt} header: use --format {fits}$"):
        ingest(src, fmt, tmp_path / "d")


@pytest.mark.parametrize("content, fmt, fits", [("1 1 2 3 4 5\n2 6 7\n", "taobao", "sequences"),
                                                ("1 1 2 3 4 5\n", "movielens", "sequences"),
                                                ("1,10,3,pv,100\n", "sequences", "taobao")])
def test_a_file_without_one_valid_record_names_the_format_its_first_line_has(tmp_path, content, fmt, fits):
    src = write(tmp_path / "log.txt", content)
    with pytest.raises(PipelineError, match=rf"^{src}:1: no line is a valid {fmt} record; .*; line 1 looks like .*: "
                                            rf"use --format {fits}$"):
        ingest(src, fmt, tmp_path / "d")


@pytest.mark.parametrize("name, fits", [("amazon-beauty/Beauty.txt", "sequences"),
                                        ("ml-100k/ml-100k.inter", "recbole")])
def test_real_logs_read_as_csv_name_their_format(tmp_path, shared_data, name, fits):
    with pytest.raises(PipelineError, match=rf":1: this looks like .*: use --format {fits}$"):
        ingest(shared_data(name), "csv", tmp_path / "d")


def test_csv_reads_parquet_through_the_same_rules(tmp_path):
    src = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": ["a", "b", None, "c", "d"], "i": ["x", "y", "z", "w", "v"],
                             "t": [1, 2, 3, 1e30, 4.5], "r": [1.0, 99.0, 2.0, 3.0, 4.0]}), src)
    summary = ingest(src, "csv", tmp_path / "d", user_col="u", item_col="i", time_col="t", rating_col="r")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["row"], e["timestamp"]) for e in events] == [(1, 1), (5, 4)]
    assert {r: q["rule"] for r, q in quarantine.items()} == {2: "rating_in_range", 3: "user_id_not_null",
                                                             4: "timestamp_in_range"}
    assert quarantine[4]["raw"] == "c,w,1e+30,3"  # a Parquet row shows its values
    assert summary["timestamps_truncated"] == 1 and balanced(summary)


def test_one_column_cannot_take_two_roles(tmp_path):
    src = write(tmp_path / "r.csv", "uid,iid,ts,rating\n1,2,3,4\n")
    pq.write_table(pa.table({"uid": ["1"], "iid": ["2"], "ts": [3], "rating": [4.0]}), tmp_path / "r.parquet")
    for name, where in (("r.csv", "r.csv:1"), ("r.parquet", "r.parquet")):
        with pytest.raises(PipelineError, match=rf"{where}: column 'uid' is mapped to --user-col and --item-col"):
            ingest(tmp_path / name, "csv", tmp_path / "d", user_col="uid", item_col="uid", time_col="ts")
        with pytest.raises(PipelineError, match=r"column 'uid' is mapped to --user-col and --rating-col"):
            ingest(tmp_path / name, "csv", tmp_path / "d", user_col="uid", item_col="iid", time_col="ts",
                   rating_col="uid")
        # a column found by a default name only is a guess, which gives way to an option that names it
        ingest(tmp_path / name, "csv", tmp_path / f"{name}.d", user_col="uid", item_col="rating", time_col="ts")
        events, _ = outputs(tmp_path / f"{name}.d")
        assert [(e["item_id"], e["rating"]) for e in events] == [("4", None)]
    with pytest.raises(PipelineError, match=r"column 'user_id' is mapped to --user-col \(by default\) and --item-col"):
        ingest(write(tmp_path / "s.csv", "user_id,item_id,timestamp\n1,2,3\n"), "csv", tmp_path / "d",
               item_col="user_id")


def test_a_parquet_column_without_one_scalar_a_row_is_named(tmp_path):
    src = tmp_path / "nested.parquet"
    pd.DataFrame({"user_id": ["a"], "item_id": [[1, 2]], "timestamp": [1]}).to_parquet(src)
    with pytest.raises(PipelineError, match=r"nested.parquet: column 'item_id' \(--item-col\) has type list<"):
        ingest(src, "csv", tmp_path / "d")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    dates = tmp_path / "dates.parquet"  # dates are scalars: they read as ISO 8601 text
    pd.DataFrame({"user_id": ["a"], "item_id": ["x"], "timestamp": pd.to_datetime(["2024-01-02"])}).to_parquet(dates)
    ingest(dates, "csv", tmp_path / "e")
    assert [e["timestamp"] for e in outputs(tmp_path / "e")[0]] == [1704153600]


def test_sequences_positions_are_timestamps(tmp_path):
    src = write(tmp_path / "seq.txt", "u1 a b c\nu2 b\nlonely\n\nu3 c a\n")
    summary = ingest(src, "sequences", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["row"], e["user_id"], e["item_id"], e["timestamp"]) for e in events] == [
        (1, "u1", "a", 1), (1, "u1", "b", 2), (1, "u1", "c", 3), (2, "u2", "b", 1), (5, "u3", "c", 1), (5, "u3", "a", 2)]
    assert {r: q["rule"] for r, q in quarantine.items()} == {3: "column_count", 4: "column_count"}
    assert summary["rows_in"] == 8 and balanced(summary)


def test_sequences_a_later_line_of_a_user_continues_the_sequence(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.ingest, "BLOCK_BYTES", 16)  # lines of one user in several batches too
    src = write(tmp_path / "seq.txt", "u a b c\nv a b c d e\nw a\nu d e\nu a\n")
    summary = ingest(src, "sequences", tmp_path / "d")
    events, _ = outputs(tmp_path / "d")
    by_user = {}
    for e in sorted(events, key=lambda e: e["timestamp"]):
        by_user.setdefault(e["user_id"], []).append(e["item_id"])
    assert by_user == {"u": list("abcdea"), "v": list("abcde"), "w": ["a"]}  # a repeat is an event, not a duplicate
    assert summary["rows_quarantined"] == 0 and balanced(summary)


def test_taobao_behaviors_are_filtered_not_quarantined(tmp_path):
    src = write(tmp_path / "ub.csv", "1,100,7,pv,1511544070\n1,101,7,buy,1511544071\n2,100,7,cart,1511544072\n"
                                     "2,100,7,fav\n")
    summary = ingest(src, "taobao", tmp_path / "d", behaviors="buy,cart")
    events, quarantine = outputs(tmp_path / "d")
    assert [(e["row"], e["behavior"]) for e in events] == [(2, "buy"), (3, "cart")]
    assert summary["rows_filtered"] == 1 and summary["rows_quarantined"] == 1 and balanced(summary)
    assert "rows_filtered" in summary["counts"]


def test_a_behavior_no_row_has_is_named_not_a_malformed_line(tmp_path):
    src = write(tmp_path / "ub.csv", "1,10,3,buy,100\n1,11,3,buy,101\n2,10,3,cart,102\n2,11,3,buy\n")
    with pytest.raises(PipelineError, match=r"ub.csv: all 3 rows were filtered out by --behaviors fav,pv, which no "
                                            r"row has; the file's behaviors: buy \(2\), cart \(1\) \(1 more would be "
                                            r"quarantined; the first, line 4: expected 5 fields"):
        ingest(src, "taobao", tmp_path / "d", behaviors="fav,pv")


def test_a_taobao_behavior_that_does_not_exist_is_refused_before_reading(tmp_path):
    src = write(tmp_path / "ub.csv", "1,10,3,buy,100\n2,10,3,cart,102\n")
    with pytest.raises(PipelineError, match=r"^--behaviors carts,Buy: not a taobao behavior; taobao's are pv, buy, "
                                            r"cart, fav$"):
        ingest(src, "taobao", tmp_path / "d", behaviors="buy,carts,Buy")
    assert not (tmp_path / "d").exists()


def behavior_log(tmp_path, kind):
    rows = [("u1", "i1", 10, "view"), ("u1", "i2", 11, "buy"), ("u2", "i1", 12, "view"), ("u2", "i3", 13, None)]
    if kind == "parquet":
        src = tmp_path / "log.parquet"
        pq.write_table(pa.table(list(zip(*rows)), names=["user_id", "item_id", "timestamp", "behavior"]), src)
        return src
    return write(tmp_path / "log.csv", "user_id,item_id,timestamp,behavior\n"
                 + "".join(f"{u},{i},{t},{b or ''}\n" for u, i, t, b in rows) + "u3,i4\n")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_behavior_that_matched_no_row_is_a_warning_and_in_the_summary(tmp_path, caplog, kind):
    # not an error: a nightly run that keeps a rare behavior must not fail on a day without it
    summary = ingest(behavior_log(tmp_path, kind), "csv", tmp_path / "d", behaviors="buy,carts")
    assert [e["item_id"] for e in outputs(tmp_path / "d")[0]] == ["i2"]
    assert summary["behaviors_unmatched"] == ["carts"] and summary["behaviors_seen"] == {"view": 2, "buy": 1}
    assert summary["rows_filtered"] == 3 and balanced(summary)
    assert any(r.levelname == "WARNING" and r.getMessage().endswith(
        "--behaviors carts matched no row; the file's behaviors: view (2), buy (1)") for r in caplog.records)
    with pytest.raises(PipelineError, match=r"all 4 rows were filtered out by --behaviors carts,cart, which no row "
                                            r"has; the file's behaviors: view \(2\), buy \(1\)"):
        ingest(behavior_log(tmp_path, kind), "csv", tmp_path / "e", behaviors="carts,cart")


def test_a_column_of_too_many_behaviors_to_list_is_questioned(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.ingest, "BEHAVIORS_SEEN_MAX", 2)
    src = write(tmp_path / "log.csv", "user_id,item_id,timestamp,behavior\nu1,i1,10,a\nu1,i2,11,b\nu2,i1,12,c\n")
    assert ingest(src, "csv", tmp_path / "d", behaviors="a,z")["behaviors_seen"] is None
    with pytest.raises(PipelineError, match=r"the file's behaviors: more than 2 different values \(is that the "
                                            r"behavior column\?\)$"):
        ingest(src, "csv", tmp_path / "e", behaviors="z")


def test_a_typo_in_taobao_behaviors_of_the_real_log_is_refused(tmp_path, shared_data):
    with pytest.raises(PipelineError, match=r"--behaviors carts: not a taobao behavior"):
        ingest(shared_data("taobao-sample/UserBehavior.csv"), "taobao", tmp_path / "d", behaviors="buy,carts")


def test_a_file_with_every_row_quarantined_fails_and_keeps_both_outputs(tmp_path):
    src = write(tmp_path / "ms.csv", "user_id,item_id,timestamp\nu1,i1,1600000000000\nu1,i2,1600000001000\n"
                                     "u2,,5\n")  # milliseconds, not seconds
    with pytest.raises(PipelineError, match=r"ms.csv: no row was kept: all 3 rows were quarantined, by rule "
                                            r"timestamp_in_range \(2\), item_id_not_null \(1\); the first under "
                                            r"timestamp_in_range, line 2: .*got '1600000000000'; see .*quarantine"):
        ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")  # nothing lost: quarantine.parquet says why
    assert events == [] and sorted(quarantine) == [2, 3, 4]


def read_lines(path):
    with open(path, newline="") as f:
        return f.read().splitlines()


def test_ml100k_real_counts(tmp_path, shared_data):
    src = shared_data("ml-100k/ml-100k.inter")
    rows = list(csv.reader(read_lines(src)[1:], delimiter="\t"))
    seen, duplicates = set(), 0
    for user, item, rating, ts in rows:
        key = (user, item, float(rating), int(float(ts)))
        duplicates += key in seen
        seen.add(key)
    summary = ingest(src, "recbole", tmp_path / "d")
    assert summary["rows_in"] == len(rows)
    assert summary["rows_kept"] == len(rows) - duplicates
    assert summary["rows_quarantined"] == duplicates and balanced(summary)


def test_taobao_sample_real_counts(tmp_path, shared_data):
    src = shared_data("taobao-sample/UserBehavior.csv")
    lines = read_lines(src)
    fields = [line.split(",") for line in lines]
    whole = [f for f in fields if len(f) == 5]
    wanted = [f for f in whole if f[3] in ("buy", "cart")]
    unique = {(f[0], f[1], f[3], int(f[4])) for f in wanted}
    summary = ingest(src, "taobao", tmp_path / "d", behaviors=["buy", "cart"])
    assert summary["rows_in"] == len(lines)
    assert summary["rows_filtered"] == len(whole) - len(wanted)
    assert summary["rows_kept"] == len(unique)
    assert summary["quarantine_reasons"].get("column_count", 0) == len(fields) - len(whole)
    assert balanced(summary)


def test_a_corrupted_copy_of_a_real_log_loses_no_row(tmp_path, shared_data):
    lines = read_lines(shared_data("taobao-sample/UserBehavior.csv"))[:3000]
    u, i, c, b, t = lines[10].split(",")
    damage = {  # 1-based line in the corrupted file -> (text, rule)
        101: (f"{u},{i},{c}", "column_count"),
        102: (f"{u},{i},{c},{b},{t},extra", "column_count"),
        103: (f"user{u},{i},{c},{b},{t}", "user_id_well_formed"),
        104: (f"{u},,{c},{b},{t}", "item_id_not_null"),
        105: (f"{u},{i},{c},{b},yesterday", "timestamp_parses"),
        106: (f"{u},{i},{c},{b},{int(t) * 1000}", "timestamp_in_range"),  # milliseconds
        107: (lines[10], "duplicate_event"),
        108: ("", "column_count"),  # a blank line
    }
    out = lines[:100] + [text for _, (text, _) in sorted(damage.items())] + lines[100:] + [lines[-1][:7]]
    src = write(tmp_path / "corrupt.csv", "\n".join(out))  # the last line is cut short, without a newline
    damage[len(out)] = (lines[-1][:7], "column_count")
    summary = ingest(src, "taobao", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert summary["rows_in"] == len(out) == summary["rows_kept"] + summary["rows_quarantined"]
    assert {r: q["rule"] for r, q in quarantine.items() if r in damage} == {r: rule for r, (_, rule) in damage.items()}
    assert {r: quarantine[r]["raw"] for r in damage} == {r: text for r, (text, _) in damage.items()}
    kept_rows = {e["row"] for e in events}
    assert not kept_rows & set(damage) and len(kept_rows) == len(events)


@pytest.mark.parametrize("name, content, fmt, line", [
    ("missing.csv", None, "csv", None),
    ("empty.csv", b"", "csv", 1),
    ("binary.csv", b"user_id,item_id,timestamp\nu,i,1\n\x00\x01\x02garbage", "csv", 3),
    ("header_only.csv", b"user_id,item_id,timestamp\n", "csv", 2),
    ("all_wrong.dat", b"1::2\n3::4\n5::6\n", "movielens", 1),
    ("all_wrong.csv", b"a,b,c,d,e,f\n1\n2\n", "taobao", 1),
])
def test_unreadable_files_fail_with_file_and_line_and_leave_nothing(tmp_path, name, content, fmt, line):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    data_dir = tmp_path / "d"
    with pytest.raises(PipelineError) as err:
        ingest(src, fmt, data_dir)
    message = str(err.value)
    assert str(src) in message
    if line is not None:
        assert f"{src}:{line}:" in message
    assert not data_dir.exists() or not any(data_dir.iterdir())


@pytest.mark.parametrize("content", [b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF32_BE,
                                     b" \n\r\n\t\n", codecs.BOM_UTF8 + b"\r\n\r\n"])
@pytest.mark.parametrize("fmt", ["csv", "sequences", "movielens"])
def test_a_file_of_white_space_or_a_byte_order_mark_is_empty(tmp_path, content, fmt):
    src = write(tmp_path / "blank.txt", content)
    with pytest.raises(PipelineError, match=rf"^{src}:1: file is empty\b.*; expected {fmt} records$"):
        ingest(src, fmt, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_white_space_is_empty_only_when_nothing_follows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.ingest, "HEAD_BYTES", 8)  # the text lies past the head
    summary = ingest(write(tmp_path / "seq.txt", b"\n" * 20 + b"u a b\n"), "sequences", tmp_path / "d")
    assert (summary["rows_kept"], summary["rows_quarantined"]) == (2, 20)


def test_options_that_do_not_apply_are_refused(tmp_path):
    src = write(tmp_path / "s.txt", "u a b\n")
    with pytest.raises(PipelineError, match="behaviors do not apply to format sequences"):
        ingest(src, "sequences", tmp_path / "d", behaviors="buy")
    with pytest.raises(PipelineError, match="unknown format"):
        ingest(src, "jsonl", tmp_path / "d")
    with pytest.raises(PipelineError, match="--rating-min 5 is above --rating-max 1"):
        ingest(src, "sequences", tmp_path / "d", rating_min=5, rating_max=1)


@pytest.mark.parametrize("option, value, expected", [
    ("delimiter", 5, 'one character (a string), e.g. "," or "\\t"'),
    ("user_col", ["user"], "a header name (a string)"),
    ("behaviors", ["buy", 1], 'a list of strings or one comma-separated string, e.g. "buy,cart"'),
    ("rating_min", "1", "a number"),
    ("rating_max", True, "a number"),
])
def test_an_option_of_the_wrong_type_is_named_before_reading(tmp_path, option, value, expected):
    src = write(tmp_path / "log.csv", "user_id,item_id,timestamp,behavior\nu,i,1,buy\n")
    with pytest.raises(PipelineError) as raised:
        ingest(src, "csv", tmp_path / "d", **{option: value})
    assert str(raised.value) == f"option {option}={value!r} of format csv: expected {expected}"
    assert not (tmp_path / "d").exists()


def test_no_source_ingests_the_synthetic_log(tmp_path):
    pytest.importorskip("pipeline.synthetic")
    summary = ingest(None, "csv", tmp_path / "d")
    assert (tmp_path / "d" / "raw" / "synthetic.csv").is_file()
    assert summary["rows_kept"] > 0 and summary["rows_quarantined"] >= 1 and balanced(summary)


def test_cli_json_contract(tmp_path):
    src = write(tmp_path / "ub.csv", "1,100,7,pv,1511544070\n1,101,7,buy,1511544071\n1,101,7\n")
    result = CliRunner().invoke(app, ["ingest", str(src), "--format", "taobao", "--behaviors", "buy",
                                      "--data-dir", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"rows_in", "rows_kept", "rows_quarantined", "quarantine_reasons", "output", "rows_filtered"} <= set(summary)
    assert (summary["rows_in"], summary["rows_kept"], summary["rows_quarantined"], summary["rows_filtered"]) == (3, 1, 1, 1)
    assert summary["quarantine_reasons"] == {"column_count": 1}
    assert pq.read_table(summary["output"]).num_rows == 1


def test_cli_exits_2_with_one_line_for_a_bad_file(tmp_path):
    missing = tmp_path / "nope.csv"
    done = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "ingest", str(missing),
                           "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "nope.csv" in done.stderr and "not found" in done.stderr


def test_lines_that_are_not_utf8_are_quarantined_not_fatal(tmp_path):
    src = write(tmp_path / "log.csv", b"user_id,item_id,timestamp\nu1,i1,10\nu\xff2,i2,11\nu3,i3,12\n")
    summary = ingest(src, "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [e["row"] for e in events] == [2, 4]
    assert quarantine[3]["rule"] == "utf8_text" and quarantine[3]["raw"] == "u\\xff2,i2,11"
    assert "not valid UTF-8" in quarantine[3]["detail"] and quarantine[3]["source"] == str(src)
    seq = write(tmp_path / "seq.txt", b"u1 a b\nu2 \xfe c\n")
    ingest(seq, "sequences", tmp_path / "s")
    _, quarantine = outputs(tmp_path / "s")
    assert {r: (q["rule"], q["raw"]) for r, q in quarantine.items()} == {2: ("utf8_text", "u2 \\xfe c")}


def test_a_header_that_is_not_utf8_names_the_file_and_line(tmp_path):
    src = write(tmp_path / "latin1.csv", b"user_id,caf\xe9,timestamp\nu1,i1,10\n")
    with pytest.raises(PipelineError, match=rf"{src}:1: not UTF-8 text"):
        ingest(src, "csv", tmp_path / "d")


WINDOWS_EXPORT = 'user_id,item_id,timestamp\r\nu1,café,100\r\n1,"3, a",abc\r\nu2,i2\r\nü3,"i3,102\r\nu4,i4,103\r\n'


@pytest.mark.parametrize("encoding, mark", [("utf-16-le", "\ufeff"), ("utf-16-be", "\ufeff"),
                                            ("utf-32-le", "\ufeff"), ("utf-32-be", "\ufeff"),
                                            ("utf-8", "\ufeff"), ("utf-8", "")])
def test_utf16_and_utf32_with_a_byte_order_mark_read_as_utf8(tmp_path, monkeypatch, encoding, mark):
    monkeypatch.setattr(pipeline.ingest, "BLOCK_BYTES", 40)  # the quarantined lines in blocks of their own
    expected = ingest(write(tmp_path / "plain.csv", WINDOWS_EXPORT), "csv", tmp_path / "plain")
    summary = ingest(write(tmp_path / "export.csv", (mark + WINDOWS_EXPORT).encode(encoding)), "csv", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert events == outputs(tmp_path / "plain")[0] and events[0]["item_id"] == "café"
    assert [(r, q["raw"], q["rule"]) for r, q in quarantine.items()] == [
        (3, '1,"3, a",abc', "item_id_well_formed"), (4, "u2,i2", "column_count"),
        (5, 'ü3,"i3,102', "unbalanced_quote")]
    assert {k: summary[k] for k in ("rows_in", "rows_kept", "rows_quarantined")} == \
        {k: expected[k] for k in ("rows_in", "rows_kept", "rows_quarantined")}


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    src = write(tmp_path / "ub.csv", "\ufeff1,100,7,pv\n1,101,7,buy,1511544071\n")
    ingest(src, "taobao", tmp_path / "d")
    events, quarantine = outputs(tmp_path / "d")
    assert [e["user_id"] for e in events] == ["1"] and quarantine[1]["raw"] == "1,100,7,pv"


@pytest.mark.parametrize("encoding", ["UTF-16LE", "UTF-16BE", "UTF-32LE", "UTF-32BE"])
def test_utf16_without_a_byte_order_mark_is_refused_with_the_command_that_converts_it(tmp_path, encoding):
    src = write(tmp_path / "u.csv", WINDOWS_EXPORT.encode(encoding))
    with pytest.raises(PipelineError, match=rf"{src}:1: {encoding} text without a byte order mark; .* "
                                            rf"iconv -f {encoding} -t UTF-8 {src} > {tmp_path}/u.utf8.csv"):
        ingest(src, "csv", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_broken_utf16_file_names_the_file_and_the_byte(tmp_path):
    data = ("\ufeff" + WINDOWS_EXPORT).encode("utf-16-le")
    src = write(tmp_path / "cut.csv", data + b"1")  # cut in the middle of a character
    with pytest.raises(PipelineError, match=rf"{src}: not valid UTF-16 text at byte {len(data)} \(truncated data\)"):
        ingest(src, "csv", tmp_path / "d")


def test_lines_of_a_decoded_file_are_found_backwards_too(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.ingest, "BLOCK_BYTES", 16)  # a decoded stream cannot seek: it is read again
    text = "".join(f"u{n},i{n},{n}\r\n" for n in range(1, 30))
    src = write(tmp_path / "u16.csv", ("\ufeff" + text).encode("utf-16-le"))
    blocks = []
    list(pipeline.ingest._read(src, ("a", "b", "c"), 0, ",", True, [], str, blocks))
    with pipeline.ingest._SourceLines(src, blocks) as source:
        for rows in ([25, 3], [28], [2], [29, 1]):
            assert source.text(np.array(rows)).to_pylist() == [text.splitlines()[r - 1] for r in rows]
