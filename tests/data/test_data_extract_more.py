"""The four added domains' converters, on small committed excerpts of the real packages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from readme_jax.data import corpora, extract, extract_more, fetch

DATA = Path(__file__).parents[1] / "fixtures" / "extract_more"


def test_ec02_decodes_the_last_window_of_the_kjv():
    text = extract_more.decode_ec02((DATA / "kjv_last_window.ec02").read_bytes())
    assert text.rstrip().endswith(
        "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen."
    )
    docs = extract_more.kjv_chapters(text)
    # the window starts inside Rev 18:23; chapters 18 (partial) to 22 follow
    assert [d.doc_id for d in docs] == [f"kjv/00-Rev/{c:03d}" for c in (18, 19, 20, 21, 22)]
    rev22 = docs[-1].text.split("\n")
    assert len(rev22) == 21  # Revelation 22 has 21 verses
    assert rev22[0].startswith("And he shewed me a pure river of water of life")
    assert not re.search(r"Rev\d+:\d+", docs[-1].text)  # references removed


def test_ec02_rejects_other_files_and_bad_offsets():
    with pytest.raises(extract_more.ExtractError, match="EC02"):
        extract_more.decode_ec02(b"\x1f\x9d\x90 not a bible")
    data = bytearray((DATA / "kjv_last_window.ec02").read_bytes())
    data[0x60:0x64] = (len(data) + 10).to_bytes(4, "big")  # last offset past the end
    with pytest.raises(extract_more.ExtractError, match="offsets"):
        extract_more.decode_ec02(bytes(data))


def test_roff_tables_and_escapes():
    text = extract_more.roff_to_text((DATA / "units.7").read_text())
    assert text.startswith("units(7)\n\nNAME\n\nunits - decimal and binary prefixes")
    assert "k  kilo  10^ 3  = 1000" in text  # a tbl row, \[ha] and \- resolved
    assert "\u00b5  micro" in text
    assert "but have an additional 'i' (and \"Ki\" starts with a capital 'K')." in text
    assert not re.search(r"(?m)^\.", text) and "\\" not in text


def test_roff_fonts_fill_and_examples():
    text = extract_more.roff_to_text((DATA / "sigevent.7").read_text())
    assert "SYNOPSIS\n\n#include <signal.h>\n\nunion sigval {" in text  # .nf keeps lines
    # .BR runs its arguments together; filled lines join into one paragraph line
    assert "sigevent - structure for notification from asynchronous routines" in text
    assert "timer_create(2)" in text and "\\f" not in text
    assert extract_more.roff_to_text(".so man7/other.7\n") == ""


def test_pod_sections_and_codes():
    docs = extract_more.pod_sections("perlintro", (DATA / "perlintro_head.pod").read_text())
    assert [d.doc_id for d in docs][:2] == ["perl/perlintro/00", "perl/perlintro/01"]
    assert docs[0].text == "NAME\n\nperlintro - a brief introduction and overview of Perl"
    body = docs[1].text
    assert body.startswith("DESCRIPTION\n\nThis document is intended to give you a quick")
    assert "You are strongly advised" in body and "found in perltoc." in body  # I<>, L<>
    assert '\n print "Hello, world";\n' in body  # verbatim paragraph kept
    assert not re.search(r"[BICLEFSXZ]<", body)


def test_perl_documents_drop_repeated_sections_and_the_contents_page():
    src = (DATA / "perlintro_head.pod").read_text()
    docs = extract_more.perl_documents([("perlintro", src), ("perlcopy", src), ("perltoc", src)])
    assert [d.doc_id for d in docs] == [
        d.doc_id for d in extract_more.pod_sections("perlintro", src)
    ]


@pytest.mark.parametrize(
    "pod, want",
    [
        ("C<< $a <=> $b >>", "$a <=> $b"),
        ("B<I<nested>>", "nested"),
        ("E<lt>fhE<gt>", "<fh>"),
        ("L<the docs|perlfunc/open>", "the docs"),
        ('L<perlfunc/"open">', '"open" in perlfunc'),
        ("X<index>word", "word"),
        ("E<0x41>", "A"),
    ],
)
def test_pod_inline(pod, want):
    assert extract_more.pod_inline(pod) == want


def test_postgres_page_without_navigation():
    text = extract.html_to_text(
        (DATA / "tutorial-concepts.html").read_text(),
        skip_classes=extract_more._PG_SKIP_CLASSES,
    )
    assert text.startswith("2.2. Concepts\n\nPostgreSQL is a relational database management")
    assert "Prev" not in text and "Next" not in text and "Home" not in text
    assert len(text) > 1000


def test_eight_domain_preset_and_sources_are_pinned():
    assert corpora.DOMAIN_PRESETS["four"] == corpora.DEFAULT_DOMAINS
    eight = corpora.DOMAIN_PRESETS["eight"]
    assert len(eight) == 8 and eight[:4] == corpora.DEFAULT_DOMAINS
    assert list(corpora.parse_domain_spec(["eight"])) == list(eight)
    assert corpora.parse_domain_spec(["four", "legal=/x.jsonl"])["legal"] == "/x.jsonl"
    sources = fetch.load_sources()
    for name in eight:
        assert name in corpora.DESCRIPTIONS
        for key in corpora.DOMAIN_SOURCES[name]:
            sha = sources[key]["sha256"]
            assert isinstance(sha, dict) or re.fullmatch(r"[0-9a-f]{64}", sha), key
