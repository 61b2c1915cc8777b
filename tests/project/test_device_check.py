"""tools/device_check.sh --smoke: the accelerator check end to end on CPU with tiny shapes, so
that the prepared script cannot rot between the rare runs on an accelerator machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_smoke_writes_every_section(tmp_path):
    env = dict(os.environ)  # one CPU device, as on the accelerator; conftest's -O0 flag kept
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" not in f)
    env["PYTHON"] = sys.executable
    out = tmp_path / "out"
    proc = subprocess.run([str(ROOT / "tools" / "device_check.sh"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "device_check.json").read_text())
    md = (out / "device_check.md").read_text()
    assert rep["smoke"] and rep["env"]["platform"] == "cpu"
    assert rep["env"]["imports_absent_on_device"] == []  # grain, ml-collections, gguf
    assert rep["probe"]["hbm_copy_bw"] > 0 and rep["probe"]["bf16_matmul_flops"] > 0
    sh = rep["shapes"]["smoke"]
    assert not sh.get("errors") and not sh["skipped"]
    rows = {(r["model"], r["batch"]) for r in sh["decode"]["rows"]}
    assert rows == {(m, b) for m in ("dense", "readme") for b in (1, 8)}
    assert all(r["tok_s"] > 0 and r["hbm_bound_tok_s"] > 0 for r in sh["decode"]["rows"])
    assert sh["load"]["whole_expert"]["bytes_per_s"] > 0
    runs = sh["cache"]["runs"]
    assert {(r["policy"], r["prefetch"]) for r in runs if r["capacity"] == 2} == {
        (p, pf) for p in ("belady", "lru") for pf in (False, True)
    }
    # every run generated the same tokens (greedy; the cache changes timing, not outputs), and
    # the cost model predicted each one
    want = runs[0]["generated_tokens"]
    assert want > 0 and all(r["generated_tokens"] == want for r in runs)
    assert all(r["predicted_s_h200_datasheet"] > 0 for r in runs)
    assert next(r for r in runs if r["policy"] == "all")["hit_ratio"] == 1.0
    assert sh["train"]["model_flops_s"] > 0 and sh["train"]["step_s"] > 0
    assert "| readme | 8 |" in md and "predicted s (h200_datasheet)" in md
