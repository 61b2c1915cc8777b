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


def test_forward_generation_of_a_kept_model_equals_the_decode_steps(tmp_path):
    work = tmp_path / "work"
    base = [
        sys.executable, str(ROOT / "tools/scale_test.py"), "--new-tokens", "4",
        "--min-free-gb", "0", "--json", str(tmp_path / "a.json"),
    ]  # fmt: skip
    small = ["--layers", "2", "--dim", "128", "--ffn", "352", "--heads", "4", "--vocab", "512"]
    small += ["--seqs", "2", "--seq-len", "32", "--dir", str(work), "--keep"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(base + small, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    decode = json.loads((tmp_path / "a.json").read_text())["tokens"]
    for how in ("forward",):  # stacked == decode: tests/model/test_moe.py, test_quant.py
        again = base[:-1] + [str(tmp_path / f"{how}.json"), "--from-moe", str(work / "moe_init")]
        r = subprocess.run(
            again + ["--generate", how], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads((tmp_path / f"{how}.json").read_text())
        assert [s["stage"] for s in res["stages"]] == ["load MoE", "generate"]
        assert res["tokens"] == decode and len(decode) == 4, how
        assert res["weight_bytes"] > 0
    assert (work / "moe_init").exists()  # a model given with --from-moe is not deleted


def test_dense_serving_in_both_layouts_gives_the_same_tokens_and_the_stacked_holds_one_copy(
    tmp_path,
):
    """--serve-dense both: the written bf16 checkpoint loaded and served in each decode layout,
    each in its own process; the same greedy tokens, figures against the weight bytes, and the
    stacked layout's steady memory below the trimmed one's (the trimmed layout adds a second copy
    of the weights)."""
    work, out = tmp_path / "work", tmp_path / "serve.json"
    cmd = [
        sys.executable, str(ROOT / "tools/scale_test.py"), "--layers", "2", "--dim", "1024",
        "--ffn", "2816", "--heads", "8", "--vocab", "512", "--new-tokens", "4",
        "--min-free-gb", "0", "--serve-dense", "both", "--dir", str(work), "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    t, s = json.loads(out.read_text())["rows"]
    assert (t["layout"], s["layout"]) == ("trimmed", "stacked")
    assert [x["stage"] for x in t["stages"]] == ["write", "load", "generate"]
    assert [x["stage"] for x in s["stages"]] == ["load", "generate"]
    assert t["tokens"] == s["tokens"] and len(s["tokens"]) == 4
    assert t["weight_bytes"] == s["weight_bytes"] > 0
    assert s["token_bytes"] <= s["weight_bytes"] and s["bound_tok_s"] > 0
    assert s["decode_tok_s"] > 0
    # steady: the loaded weights (+ runtime) vs those plus the decode layout's copy of the
    # layers (96% of the weights at these widths)
    gap = (t["steady_x"] - s["steady_x"]) * s["weight_bytes"]
    assert gap > 0.5 * s["weight_bytes"], (t["steady_x"], s["steady_x"], s["weight_bytes"])
    assert "| stacked |" in r.stdout  # the table
    assert not work.exists()  # the written checkpoint is removed without --keep
