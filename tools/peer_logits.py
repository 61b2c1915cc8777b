"""Logits from Hugging Face transformers' PyTorch `LlamaForCausalLM`: the parity peer.

Runs only where torch is installed (the project venv has no torch; use the peer venv):

    .venv-peer/bin/python tools/peer_logits.py MODEL_DIR TOKENS.npy LOGITS.npy [MODEL_DIR ...]

TOKENS.npy holds int token ids [B, S]; LOGITS.npy receives float32 logits [B, S, V]. Several
(model, tokens, logits) triples run in one process (torch and transformers import once). Each
model is loaded with `AutoModelForCausalLM` (the class its config.json names: Llama, Mistral) in
float32 with eager attention, so it is the plainest reference transformers offers.
"""

from __future__ import annotations

import sys

import numpy as np


def load_peer(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def peer_logits(model, tokens_BxS: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(tokens_BxS, dtype=np.int64))
        logits_BxSxV = model(input_ids=ids, use_cache=False).logits
    return logits_BxSxV.float().numpy()


def main(argv: list[str]) -> None:
    if not argv or len(argv) % 3:
        sys.exit(__doc__)
    for i in range(0, len(argv), 3):
        model_dir, tokens_path, out_path = argv[i : i + 3]
        logits = peer_logits(load_peer(model_dir), np.load(tokens_path))
        np.save(out_path, logits.astype(np.float32))


if __name__ == "__main__":
    main(sys.argv[1:])
