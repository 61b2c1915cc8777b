"""The paper-scale conversion command (tools/scale_test.py, `make scale-test`) at a small width:
write a random sharded checkpoint, load it one layer at a time, calibrate, refactor into arrays
in files while the checkpoint's shards are deleted, save, load the Read-ME model and generate.
The full-width figures are in docs/benchmarks.md ("Paper width on one host")."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_scale_conversion_runs_end_to_end(tmp_path):
    work, out = tmp_path / "work", tmp_path / "scale.json"
    cmd = [
        sys.executable, str(ROOT / "tools/scale_test.py"), "--layers", "2", "--dim", "128",
        "--ffn", "352", "--heads", "4", "--vocab", "512", "--seqs", "2", "--seq-len", "32",
        "--moe-arrays", "disk", "--consume-checkpoint", "--new-tokens", "3",
        "--min-free-gb", "0", "--dir", str(work), "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    stages = [s["stage"] for s in res["stages"]]
    assert stages == ["write", "load", "calibrate", "refactor", "save", "load MoE", "generate"]
    assert all(s["wall_s"] >= 0 and s["peak_gb"] > 0 for s in res["stages"])
    assert len(res["tokens"]) == 3 and all(0 <= t < 512 for t in res["tokens"])
    # remain rate 0.5: the shared expert and one routed expert hold half of the FFN's channels
    w = res["widths"]
    assert w["shared_width_mean"] + w["expert_width_mean"] == 352 // 2
    assert res["moe_bytes"] > 0 and res["checkpoint_bytes"] > 0
    assert not work.exists()  # the work directory (checkpoint, arrays, model) is removed
