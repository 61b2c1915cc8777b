"""launch/serve_bench.py end to end on the tiny model, and the cost model it simulates with."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from readme_jax.serve.bench import costmodel as cm
from readme_jax.serve.bench.replay import read_log, replay_check

ROOT = Path(__file__).resolve().parents[2]


def _serve_bench():
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "launch/serve_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serve_bench_runs_end_to_end_and_its_logs_replay(tmp_path):
    argv = [
        "--model=tiny",
        f"--out_dir={tmp_path}",
        "--num_requests=6",
        "--rate=2",
        "--prompt_len=4,16",
        "--output_len=4,8",
        "--config.engine.num_slots=4",
        "--config.engine.max_len=64",
        "--config.engine.prefill_chunk=8",
        "--config.engine.max_batch_tokens=16",
        "--capacities=2",
        "--policies=belady,lru",
        "--batching=expert,decode",
        "--profiles=a100",
        "--scales=served,llama2-7b",
        "--real_grid=full",
        "--sim_logs",
    ]
    res = _serve_bench().main(argv)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["serve_bench"]["outputs_identical"] is True
    report = (tmp_path / "report.md").read_text()
    assert "Expert cache hit ratio" in report and "prefetch vs on-demand" in report
    assert (tmp_path / "hit_ratio.png").stat().st_size > 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    # report.py schema: hit_ratio {policy: {C: ratio}}, latency {name: [per request]}
    hit = res["serving"]["hit_ratio"]  # every policy on the reference run's request sequence
    assert set(hit) == {"belady", "lru"} and hit["belady"][2] >= hit["lru"][2]
    online = res["serve_bench"]["hit_ratio_online"]  # each policy in its own engine run
    assert online["belady (offline optimum)"][2] >= online["belady"][2] - 1e-12
    assert all(len(v) == 6 for v in res["serving"]["latency"].values())
    runs = res["serve_bench"]["real"]
    assert {(r["batching"], r["policy"], r["capacity"], r["prefetch"]) for r in runs} == {
        ("expert", "all", 4, False),
        ("decode", "all", 4, False),
        ("expert", "belady", 2, False),
        ("expert", "lru", 2, False),
        ("decode", "belady", 2, False),
        ("decode", "lru", 2, False),
        ("expert", "belady", 2, True),
    }
    for r in runs:  # every reported hit ratio is re-derived from its dumped decision log
        log = read_log(tmp_path / r["cache_log"])
        assert replay_check(log).hit_ratio == pytest.approx(r["hit_ratio"])
        steps = [
            json.loads(x)
            for x in (tmp_path / r["cache_log"].replace(".cache.", ".steps."))
            .read_text()
            .splitlines()
        ]
        assert len(steps) == r["steps"] and all(s["calls"] for s in steps)
    sims = res["serve_bench"]["sim"]["runs"]
    assert len(sims) == 2 * (2 + 2 * 2 * 2)  # 2 scales x (all-resident + policy x batching x mode)
    assert all(r["completed"] == 6 for r in sims)
    for r in sims:
        if "cache_log" in r:
            assert replay_check(read_log(tmp_path / r["cache_log"])).hits == r["hits"]
    loc = res["routing"]["locality"]["whole sequences"]
    assert 0 <= loc["keep_fraction"] <= 1 and loc["n_tokens"] > 0


MC = cm.ModelCost(
    "m",
    layers=4,
    dim=64,
    heads=4,
    kv_heads=2,
    head_dim=16,
    vocab=100,
    ffn=128,
    shared_width=32,
    expert_width=32,
    dtype_bytes=2,
)


def _step(loads, prefetch=()):
    call = {"kind": "decode", "experts": [0, 1], "tokens": 4, "context": 40, "loads": loads}
    return {"calls": [call, dict(call, experts=[2])], "prefetch": list(prefetch)}


def test_prefetch_pipelining_never_slower_than_on_demand():
    hw = cm.a100_pcie4(MC.layers)
    for loads in (0, 1, 2):
        a = cm.CostClock(hw, MC, pipelined=False).duration(_step(loads), 0, 0)
        b = cm.CostClock(hw, MC, pipelined=True).duration(_step(loads), 0, 0)
        assert b <= a + 1e-15
        assert (loads == 0) == (a == pytest.approx(b))
    # a step's prefetches occupy the link: the next step's demand loads wait for them
    clk = cm.CostClock(hw, MC, pipelined=True)
    clk.duration(_step(0, prefetch=[[3, 0]] * 50), 0, 0.0)
    assert clk.duration(_step(1), 0, 0.0) > cm.CostClock(hw, MC).duration(_step(1), 0, 0.0)


def test_fit_cpu_recovers_known_constants():
    rng = np.random.default_rng(0)
    truth = cm.Hardware("cpu", 5e9, 1e18, 1e8, 2e-4, 1.0, 1.0, 1e-4)  # bandwidth-bound: linear
    steps = []
    for _ in range(60):
        waves = [
            {
                "kind": "prefill" if rng.random() < 0.3 else "decode",
                "experts": list(range(int(rng.integers(1, 4)))),
                "tokens": int(rng.integers(1, 32)),
                "context": int(rng.integers(1, 2000)),
                "loads": int(rng.integers(0, 3)),
            }
            for _ in range(int(rng.integers(1, 4)))
        ]
        s = {"calls": waves, "prefetch": []}
        s["wall_s"] = cm.CostClock(truth, MC, pipelined=False).duration(s, 0, 0)
        steps.append(s)
    fit = cm.fit_cpu(steps, MC)
    assert fit["r2"] > 0.999
    assert fit["bandwidth_Bps"] == pytest.approx(5e9, rel=0.02)
    assert fit["link_Bps"] == pytest.approx(1e8, rel=0.02)
    assert fit["launch_s"] == pytest.approx(2e-4, rel=0.05)
    assert fit["step_s"] == pytest.approx(1e-4, rel=0.1)


def test_scaled_cost_keeps_the_expert_fractions():
    big = cm.scaled_cost(MC, "7b", **cm.LLAMA2_7B)
    assert big.expert_width / big.ffn == pytest.approx(MC.expert_width / MC.ffn, rel=0.01)
    assert big.bytes_per_expert == 32 * 3 * 4096 * big.expert_width * 2


def test_a_negative_expert_cap_is_a_config_error(tmp_path):
    from readme_jax.model.config import ConfigError

    with pytest.raises(ConfigError, match="max_experts must be >= 0"):
        _serve_bench().main(
            ["--model=tiny", f"--out_dir={tmp_path}", "--config.engine.max_experts=-1"]
        )


def test_int8_experts_cost_a_quarter_of_the_f32_bytes_to_load_and_read():
    f32 = dataclasses.replace(MC, dtype_bytes=4)
    q8 = dataclasses.replace(f32, quant="int8")
    # one byte per weight and an f32 scale per output channel (gate/up 2 Fe, down D) per layer
    assert q8.bytes_per_expert == 4 * (3 * 64 * 32 + 4 * (2 * 32 + 64))
    ratio = f32.bytes_per_expert / q8.bytes_per_expert
    assert 3.5 < ratio < 4 and q8.dense_bytes < f32.dense_bytes / 3
    # the same device memory holds `ratio` times the experts
    assert q8.experts_in(2 * f32.bytes_per_expert) == int(2 * ratio)
    hw = cm.a100_pcie4(MC.layers)
    load = {
        m: cm.CostClock(hw, m, pipelined=False).duration(_step(2), 0, 0)
        - cm.CostClock(hw, m, pipelined=False).duration(_step(0), 0, 0)
        for m in (f32, q8)
    }
    n = sum(c["loads"] for c in _step(2)["calls"])
    assert load[q8] == pytest.approx(n * q8.bytes_per_expert / hw.link_bw)
    assert load[f32] / load[q8] == pytest.approx(ratio)
