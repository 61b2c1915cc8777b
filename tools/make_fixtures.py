"""Build the tiny Hugging Face Llama fixtures used by the parity tests.

    .venv-peer/bin/python tools/make_fixtures.py

Needs torch and transformers (the peer venv; the project venv has no torch). For each tiny random
config it writes `tests/fixtures/<name>/`: the HF model directory (`config.json`, safetensors,
sharded with `model.safetensors.index.json` for one of them), `tokens.npy` (int32 [B, S]) and
`logits.npy` (float32 [B, S, V], from transformers' eager PyTorch forward of the saved model, by
`tools/peer_logits.py` in its own process).
Deterministic: fixed seeds, so rerunning reproduces the same files.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
# the parity peer's own command (the one tests/peer.py runs), so the fixture logits and the live
# comparison come from the same code
PEER_LOGITS = Path(__file__).resolve().with_name("peer_logits.py")

CONFIGS = {
    # Grouped-query attention, untied head, plain RoPE, one safetensors file.
    "llama_gqa": dict(
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        max_shard_size=None,
    ),
    # Llama-3.x rope scaling (small original context so every frequency band is exercised),
    # tied embeddings, one kv head, head_dim * n_heads != hidden_size, sharded files.
    "llama3_tied": dict(
        config=dict(
            vocab_size=256,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
        max_shard_size="60KB",
    ),
}

B, S = 2, 24


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights at unit activation scale so logits are O(1) and every weight matters.

    HF's default init (std 0.02, norms at 1) gives near-zero logits, which would let a wrong
    layout pass an absolute-tolerance comparison.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def build(name: str, spec: dict, seed: int) -> None:
    out = FIXTURES / name
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**spec["config"], attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float().eval()
    randomize_(model, seed)
    kw = {"max_shard_size": spec["max_shard_size"]} if spec["max_shard_size"] else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    (out / "generation_config.json").unlink(missing_ok=True)

    rng = np.random.default_rng(seed)
    tokens_BxS = rng.integers(0, cfg.vocab_size, size=(B, S), dtype=np.int32)
    np.save(out / "tokens.npy", tokens_BxS)
    # Logits of the model as reloaded from disk: exactly the weights the tests will load.
    peer = [sys.executable, str(PEER_LOGITS), str(out), str(out / "tokens.npy")]
    subprocess.run([*peer, str(out / "logits.npy")], check=True)
    logits_BxSxV = np.load(out / "logits.npy")
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB, logits std {logits_BxSxV.std():.3f}, files {files}")
    print(json.dumps(json.loads((out / "config.json").read_text()), sort_keys=True))


def main() -> None:
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        build(name, spec, seed)


if __name__ == "__main__":
    main()
