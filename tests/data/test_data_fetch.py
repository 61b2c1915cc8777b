"""Fetching pinned artifacts: verification, manual supply, archive readers."""

import io
import tarfile
import zipfile

import pytest

from readme_jax.data import fetch

JANE = "r-cran-janeaustenr"


def _no_apt(monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)


def test_every_pin_has_version_file_and_checksum():
    for name, spec in fetch.load_sources().items():
        assert spec["kind"] in ("apt", "pypi"), name
        assert spec["version"] in spec["filename"], name
        shas = spec["sha256"].values() if isinstance(spec["sha256"], dict) else [spec["sha256"]]
        assert all(len(s) == 64 for s in shas), name


def test_corrupt_download_is_set_aside_and_the_error_says_how_to_supply(tmp_path, monkeypatch):
    _no_apt(monkeypatch)
    spec = fetch.load_sources()[JANE]
    bad = tmp_path / "downloads" / spec["filename"]
    bad.parent.mkdir()
    bad.write_bytes(b"half a download")
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch(JANE, tmp_path, context="domain 'fiction'")
    msg = str(e.value)
    assert msg.startswith("domain 'fiction': could not fetch r-cran-janeaustenr")
    assert f"apt-get download {JANE}=1.0.0-1" in msg and str(bad) in msg
    assert not bad.exists() and bad.with_suffix(".deb.bad").exists()


def test_manually_supplied_file_is_used_when_its_checksum_matches(tmp_path, monkeypatch):
    real = fetch.cache_root() / "downloads" / fetch.load_sources()[JANE]["filename"]
    if not real.is_file():
        pytest.skip(f"{real} not fetched (run `python launch/data.py`)")
    _no_apt(monkeypatch)  # proves no download is attempted
    target = tmp_path / "downloads" / real.name
    target.parent.mkdir()
    target.write_bytes(real.read_bytes())
    assert fetch.fetch(JANE, tmp_path) == target


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    fetch.atomic_write_bytes(target, b"done")
    assert target.read_bytes() == b"done"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_reads_members_of_wheels_and_tarballs(tmp_path):
    whl = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("x/data/a.jsonl", '{"text": "a"}\n')
        z.writestr("x/__init__.py", "")
    got = dict(fetch.iter_archive_files(whl, lambda p: p.endswith(".jsonl")))
    assert got == {"x/data/a.jsonl": b'{"text": "a"}\n'}
    tgz = tmp_path / "x-1.0.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        info = tarfile.TarInfo("x-1.0/texts/play_gut.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"ACT I"))
    assert dict(fetch.iter_archive_files(tgz, lambda p: True)) == {
        "x-1.0/texts/play_gut.txt": b"ACT I"
    }


def test_non_deb_file_is_rejected(tmp_path):
    path = tmp_path / "fake.deb"
    path.write_bytes(b"not an ar archive")
    with pytest.raises(fetch.FetchError, match="not a Debian package"):
        list(fetch.iter_deb_files(path, lambda p: True))


@pytest.mark.network
def test_deb_reader_matches_pinned_member_checksums():
    spec = fetch.load_sources()["r-cran-tokenizers"]
    debs = list((fetch.cache_root() / "downloads").glob("r-cran-tokenizers_*.deb"))
    if not debs:
        pytest.skip("r-cran-tokenizers not fetched (run `python launch/data.py`)")
    files = dict(fetch.iter_deb_files(debs[0], lambda p: p in spec["member_sha256"]))
    fetch.verify_members("r-cran-tokenizers", files)
    files[next(iter(files))] = b"tampered"
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.verify_members("r-cran-tokenizers", files)
