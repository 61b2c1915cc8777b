"""Request traces: arrival statistics, stated length distributions, JSONL round trip, errors."""

import json

import numpy as np
import pytest

from readme_jax.serve.bench.trace import (
    LengthDist,
    TraceError,
    arrival_times,
    load_trace,
    make_trace,
    save_trace,
)


def test_poisson_and_bursty_arrivals_have_the_stated_rate_and_cv():
    rng = np.random.default_rng(0)
    for cv in (1.0, 3.0):
        t = arrival_times(20_000, rate=4.0, rng=rng, cv=cv)
        gaps = np.diff(t)
        assert t[0] == 0 and np.all(gaps >= 0)
        assert abs(gaps.mean() - 0.25) < 0.02
        assert abs(gaps.std() / gaps.mean() - cv) < 0.15 * cv


def test_length_distributions_respect_their_bounds():
    rng = np.random.default_rng(1)
    x = LengthDist("lognormal", median=64, sigma=1.0, lo=8, hi=256).sample(5000, rng)
    assert x.min() >= 8 and x.max() <= 256 and 50 < np.median(x) < 80
    assert set(LengthDist("choice", values=(3, 7)).sample(100, rng)) == {3, 7}
    assert LengthDist("fixed", value=9).sample(4, rng).tolist() == [9] * 4
    assert "clipped to [8, 256]" in LengthDist(lo=8, hi=256).describe()
    with pytest.raises(TraceError, match="lo <= hi"):
        LengthDist("uniform", lo=5, hi=2)


def test_trace_is_seeded_and_crops_token_prompts():
    docs = [np.arange(100), np.arange(1000, 1050)]
    kw = dict(rate=2.0, prompt_len=LengthDist("fixed", value=16), seed=3)
    a, b = make_trace(docs, 30, **kw), make_trace(docs, 30, **kw)
    assert a == b and a != make_trace(docs, 30, rate=2.0, seed=4)
    assert all(len(r.prompt_tokens) == 16 for r in a)
    assert all(np.all(np.diff(r.prompt_tokens) == 1) for r in a)  # contiguous windows
    texts = make_trace(["one two three four five"], 5, 1.0, prompt_len=LengthDist("fixed", value=2))
    assert all(len(r.prompt.split()) == 2 for r in texts)


def test_jsonl_round_trip(tmp_path):
    trace = make_trace(["hello world", "lorem ipsum dolor"], 20, 5.0, cv=2.0, seed=1)
    trace += make_trace([[5, 6, 7, 8]], 3, 1.0, seed=2)
    trace = [
        r.__class__(i, r.arrival_s, r.max_new_tokens, r.prompt, r.prompt_tokens)
        for i, r in enumerate(trace)
    ]
    save_trace(tmp_path / "t.jsonl", trace)
    loaded = load_trace(tmp_path / "t.jsonl")
    assert loaded == sorted(trace, key=lambda r: r.arrival_s)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": 1, "arrival_s": 0, "prompt": "x"}', "missing key 'max_new_tokens'"),
        ('{"id": 1, "arrival_s": 0, "max_new_tokens": 4}', "exactly one of"),
        ('{"id": 1, "arrival_s": -1, "prompt": "x", "max_new_tokens": 4}', "arrival_s"),
        ('{"id": 1, "arrival_s": 0, "prompt": "x", "max_new_tokens": 0}', "max_new_tokens"),
        ('{"id": 1, "arrival_s": 0, "prompt_tokens": [1, -2], "max_new_tokens": 2}', "ints >= 0"),
        ('{"id": 0, "arrival_s": 0, "prompt": "x", "max_new_tokens": 2}', "duplicate id 0"),
    ],
)
def test_malformed_lines_are_named(tmp_path, line, message):
    good = json.dumps({"id": 0, "arrival_s": 0.5, "prompt": "hi", "max_new_tokens": 3})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message) as err:
        load_trace(path)
    assert "bad.jsonl:2" in str(err.value)


def test_empty_inputs_are_rejected(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(tmp_path / "e.jsonl")
    with pytest.raises(TraceError, match="at least one prompt"):
        make_trace([], 3, 1.0)
