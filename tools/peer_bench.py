"""Speed of the Hugging Face transformers / PyTorch peer on the same weights (run under torch).

    .venv-peer/bin/python tools/peer_bench.py MODEL_DIR OUT.json [--threads 2]

Measures, in float32 with `torch.set_num_threads(threads)`:
  prefill tokens/s for a 512-token prompt at batch 1 (logits of the last position only, as
    `generate` asks for and as our Generator's prefill computes),
  decode tokens/s (steady state, KV cache, greedy) at batch 1 and batch 8.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _median_step(model, torch, batch: int, prompt_len: int, steps: int) -> float:
    ids = torch.randint(100, 20000, (batch, prompt_len))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        pkv = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    res = {"torch": torch.__version__, "threads": a.threads}
    ids = torch.randint(100, 20000, (1, 512))
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            ts.append(time.perf_counter() - t)
    res["prefill_512_tok_s"] = 512 / float(np.median(ts))
    for b in (1, 8):
        res[f"decode_b{b}_tok_s"] = b / _median_step(model, torch, b, 32, a.steps)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
