"""Domains: user corpora, document splits, clear errors, text extraction, idempotent prepare."""

import json
import shutil
from pathlib import Path

import pytest

from readme_jax.data import corpora, extract, fetch
from readme_jax.data.extract import Document

CORPUS = Path(__file__).parents[1] / "fixtures" / "corpus"


def test_folder_of_txt_gives_one_document_per_file():
    docs = corpora.read_user_documents(CORPUS / "austen", "fiction")
    assert len(docs) == 6
    assert docs[0].doc_id == "persuasion_ch000.txt"
    assert all(d.text and "\r" not in d.text for d in docs)


def test_jsonl_uses_id_and_text_fields():
    docs = corpora.read_user_documents(CORPUS / "melville.jsonl", "whaling")
    assert [d.doc_id for d in docs][:2] == ["melville/mobydick/000", "melville/mobydick/001"]
    assert docs[0].text.startswith("CHAPTER 1. Loomings.")
    assert docs[1].text.startswith("CHAPTER 2. The Carpet-Bag.")


def test_split_is_by_document_and_fixed_by_seed():
    docs = [Document(f"d{i}", f"text {i}") for i in range(100)]
    cfg = corpora.SplitConfig(seed=3, validation=0.1, test=0.05)
    a = corpora.split_documents(docs, cfg)
    b = corpora.split_documents(list(reversed(docs)), cfg)
    ids = {s: {d.doc_id for d in a[s]} for s in corpora.SPLITS}
    assert [len(ids[s]) for s in corpora.SPLITS] == [85, 10, 5]
    assert set.union(*ids.values()) == {d.doc_id for d in docs}
    assert {s: {d.doc_id for d in b[s]} for s in corpora.SPLITS} == ids
    other = corpora.split_documents(docs, corpora.SplitConfig(seed=4, validation=0.1, test=0.05))
    assert {d.doc_id for d in other["test"]} != ids["test"]


def test_adding_documents_does_not_move_existing_held_out_ones():
    docs = [Document(f"d{i}", "x") for i in range(200)]
    cfg = corpora.SplitConfig(seed=0, validation=0.0, test=0.05)
    before = {d.doc_id for d in corpora.split_documents(docs, cfg)["test"]}
    after = {d.doc_id for d in corpora.split_documents(docs + [Document("new", "x")], cfg)["test"]}
    assert len(before & after) >= len(before) - 1


def test_too_few_documents_is_a_clear_error():
    with pytest.raises(corpora.CorpusError, match="too few"):
        corpora.split_documents([Document("a", "x"), Document("b", "y")], corpora.SplitConfig())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(corpora.CorpusError, match=r"domain 'legal': path does not exist"):
        corpora.prepare_domain("legal", tmp_path / "nope", cache=tmp_path)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n")
    with pytest.raises(corpora.CorpusError, match="empty corpus.*only empty .txt files"):
        corpora.read_user_documents(tmp_path / "empty", "legal")


def test_non_utf8_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    (folder / "bad.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(corpora.CorpusError, match=r"bad.txt is not valid UTF-8.*iconv"):
        corpora.read_user_documents(folder, "menu")


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(corpora.CorpusError, match=r"x.jsonl:2 has no string 'text' field"):
        corpora.read_user_documents(path, "x")


def test_parquet_reads_text_column_or_explains(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(corpora.CorpusError, match="needs pyarrow"):
            corpora.read_user_documents(tmp_path / "t.parquet", "p")
        return
    pq.write_table(pa.table({"text": ["one doc", "two doc"]}), tmp_path / "t.parquet")
    docs = corpora.read_user_documents(tmp_path / "t.parquet", "p")
    assert [d.text for d in docs] == ["one doc", "two doc"]


def test_unsupported_file_type_is_a_clear_error(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(corpora.CorpusError, match="not a folder, .jsonl or .parquet"):
        corpora.read_user_documents(tmp_path / "a.csv", "csv")


def test_prepare_is_idempotent_and_rebuilds_when_source_changes(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(CORPUS / "shakespeare", src)
    cfg = corpora.SplitConfig(seed=0, validation=0.2, test=0.2)
    m1 = corpora.prepare_domain("drama", src, cache=tmp_path, split=cfg)
    train = corpora.domain_dir("drama", tmp_path) / "train.jsonl"
    stamp = train.stat().st_mtime_ns
    assert corpora.prepare_domain("drama", src, cache=tmp_path, split=cfg) == m1
    assert train.stat().st_mtime_ns == stamp
    assert [m1["splits"][s]["documents"] for s in corpora.SPLITS] == [3, 1, 1]
    (src / "extra.txt").write_text("A new scene, long enough to count as a document. " * 10)
    m2 = corpora.prepare_domain("drama", src, cache=tmp_path, split=cfg)
    assert m2["key"] != m1["key"]
    assert sum(m2["splits"][s]["documents"] for s in corpora.SPLITS) == 6
    docs = corpora.load_documents("drama", "train", tmp_path)
    assert len(docs) == m2["splits"]["train"]["documents"]


def test_failed_domain_does_not_stop_the_others(tmp_path):
    manifests, errors = corpora.prepare_domains(
        {"fiction": CORPUS / "austen", "legal": tmp_path / "missing"}, cache=tmp_path
    )
    assert list(manifests) == ["fiction"] and list(errors) == ["legal"]
    assert "path does not exist" in errors["legal"]


def test_unfetchable_default_domain_names_domain_and_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)  # a machine without apt
    with pytest.raises(fetch.FetchError) as e:
        corpora.prepare_domain("code_docs", cache=tmp_path)
    msg = str(e.value)
    assert "domain 'code_docs'" in msg and "apt-get is not available" in msg
    assert "apt-get download python3.11-doc=" in msg and str(tmp_path / "downloads") in msg


def test_unprepared_domain_tells_how_to_prepare(tmp_path):
    with pytest.raises(corpora.CorpusError, match="launch/data.py"):
        corpora.load_documents("fiction", "train", tmp_path)


def test_play_acts_split_at_act_changes():
    text = (CORPUS / "shakespeare" / "macbeth_act1.txt").read_text()
    play = text + "\n\nACT II.\n\nSCENE I.\nMore.\n\nACT II. SCENE II.\nStill act two.\n"
    docs = extract.play_acts("macbeth", play)
    assert len(docs) == 2
    assert docs[1].text.startswith("ACT II.") and "Still act two." in docs[1].text


def test_austen_chapters_drop_front_matter():
    lines = ["PRIDE", "", "Chapter 1", "", "It is a truth.", "Chapter 2", "", "Mr. Bennet."]
    docs = extract.austen_chapters({"pp": lines})
    assert [d.text for d in docs] == ["Chapter 1\n\nIt is a truth.", "Chapter 2\n\nMr. Bennet."]


def test_html_to_text_keeps_content_and_drops_navigation():
    page = (
        '<html><head><title>T</title></head><body><div id="banner">Download</div>'
        '<ul class="docnav"><li>Prev</li></ul><div class="section"><h2>6.2. apt</h2>'
        '<div class="para">APT is  a\n  vast project.</div><pre class="screen">$ apt update\n'
        "  done</pre><ul><li>one</li><li>two</li></ul><table><tr><td>a</td><td>b</td></tr>"
        "</table></div></body></html>"
    )
    assert extract.html_to_text(page) == (
        "6.2. apt\n\nAPT is a vast project.\n\n$ apt update\n  done\n\n- one\n\n- two\n\na b"
    )


@pytest.mark.network
def test_default_domains_are_prepared_with_enough_text():
    cache = fetch.cache_root()
    for name in corpora.DEFAULT_DOMAINS:
        manifest = corpora.load_manifest(name, cache)
        if manifest is None:
            pytest.skip(f"domain {name} not prepared (run `python launch/data.py`)")
        assert manifest["sources"] == corpora.DOMAIN_SOURCES[name]
        splits = manifest["splits"]
        assert all(splits[s]["documents"] >= 8 for s in corpora.SPLITS), name
        assert splits["train"]["bytes"] > 1_000_000, name
        first = json.loads((corpora.domain_dir(name, cache) / "train.jsonl").open().readline())
        assert len(first["text"]) >= extract.MIN_DOC_CHARS
