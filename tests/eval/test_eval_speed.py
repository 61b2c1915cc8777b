"""eval/speed: the decode-speed measurements on a tiny model, and the bench section they write
into docs/benchmarks.md (replaced between its markers, the rest of the file kept)."""

import jax
import numpy as np

from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import dense_model
from readme_jax.eval import speed
from readme_jax.model import llama
from readme_jax.testing import np_init, tiny_llama_config


def test_prefill_and_decode_rates_of_a_tiny_model():
    cfg = tiny_llama_config()
    params = np_init(llama.param_shapes(cfg), np.random.default_rng(0))
    model = dense_model(cfg)
    gen = Generator(model, params)
    assert speed.prefill_tok_s(model, gen.params, S=16, reps=2) > 0
    assert 0 < speed.decode_step_time(gen, [[5, 6, 7]] * 2, steps=8) < 10
    assert speed.bytes_of(params) == sum(x.nbytes for x in jax.tree.leaves(params))


def _dense_result(peer: bool) -> dict:
    r = {"prefill_512_tok_s": 400.0, "decode_b1_tok_s": 25.0, "decode_b8_tok_s": 100.0}
    r |= {"weight_bytes": 5e8, "bandwidth_gbs": 20.0, "bound_tok_s": 40.0}
    r["fraction_of_bound"] = 25.0 / 40.0
    if peer:
        r["peer"] = {k: v / 2 for k, v in r.items() if k.endswith("tok_s")}
    return r


def test_the_bench_section_replaces_only_its_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n{speed.START}\nold\n{speed.END}\nafter\n")
    engine = {"generator_b1": 10.0, "engine_b1": 12.0, "ratio_b1": 1.2}
    engine |= {"generator_b8": 40.0, "engine_b8": 36.0, "ratio_b8": 0.9}
    section = speed.render(_dense_result(peer=True), None, "make bench")
    speed.write_section(doc, section)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("\nafter\n")
    assert "old" not in text and "| decode tok/s, batch 8 | 100.0 | 50.0 | 2.00x |" in text
    assert "ours reaches 62% of it" in text
    no_peer = speed.render(_dense_result(peer=False), None, "x")
    assert "| decode tok/s, batch 1 | 25.0 | n/a | n/a |" in no_peer
    assert "| batch 8 | 40.0 | 36.0 | 0.90x |" in "\n".join(speed.engine_lines(engine))
    fresh = tmp_path / "new.md"
    speed.write_section(fresh, section)
    assert "## Speed (make bench)" in fresh.read_text() and speed.END in fresh.read_text()
