"""The R serialization reader on real lazy-load databases from Debian r-cran-janeaustenr."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from readme_jax.data import fetch, rdata

RDATA = Path(__file__).parents[1] / "fixtures" / "rdata"


def test_reads_help_database_names_and_text():
    db = rdata.read_lazyload_db(RDATA / "janeaustenr")
    assert sorted(db) == [
        "austen_books",
        "emma",
        "janeaustenr-package",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    ]
    # An Rd page is a list of tagged sections; the \title section holds the title text.
    title = next(s for s in db["emma"].value if s.attrs.get("Rd_tag") == ["\\title"])
    assert title.value[0].value == ['The text of Jane Austen\'s novel "Emma"']


def test_reads_data_frame_with_compact_row_names():
    df = rdata.as_data_frame(rdata.read_rds(RDATA / "Rd.rds"))
    assert list(df) == [
        "File",
        "Name",
        "Type",
        "Title",
        "Encoding",
        "Aliases",
        "Concepts",
        "Keywords",
    ]
    assert df["Name"][1] == "emma"
    assert len(df["Title"]) == 8


def test_reads_package_code_with_closures_and_bytecode():
    db = rdata.read_lazyload_db(RDATA / "code")
    assert ".packageName" in db and "austen_books" in db
    assert db[".packageName"] == ["janeaustenr"]


def test_truncated_stream_raises_clear_error():
    raw = gzip.decompress((RDATA / "Rd.rds").read_bytes())
    with pytest.raises(rdata.RDataError, match="truncated"):
        rdata.unserialize(raw[: len(raw) // 2])


def test_rejects_non_r_bytes():
    with pytest.raises(rdata.RDataError, match="format"):
        rdata.unserialize(b"PK\x03\x04 not an R stream")


def test_missing_database_file_is_named():
    with pytest.raises(FileNotFoundError, match="nothere.rdx"):
        rdata.read_lazyload_db(RDATA / "nothere")


def _cached(filename: str) -> Path:
    path = fetch.cache_root() / "downloads" / filename
    if not path.is_file():
        pytest.skip(f"{path} not fetched (run `python launch/data.py`)")
    return path


@pytest.mark.network
def test_reads_austen_novels_from_the_debian_package():
    deb = _cached(fetch.load_sources()["r-cran-janeaustenr"]["filename"])
    files = dict(fetch.iter_deb_files(deb, lambda p: "/janeaustenr/data/Rdata.rd" in p))
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    novels = rdata.read_lazyload_bytes(files[base + ".rdx"], files[base + ".rdb"])
    assert len(novels) == 6
    assert novels["emma"][:3] == ["EMMA", "", "By Jane Austen"]
    assert len(novels["emma"]) == 16235
    assert np.mean([len(x or "") for x in novels["prideprejudice"]]) > 30
