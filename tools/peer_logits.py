"""Logits from Hugging Face transformers' PyTorch `LlamaForCausalLM`: the parity peer.

Runs only where torch is installed (the project venv has no torch; use the peer venv):

    .venv-peer/bin/python tools/peer_logits.py MODEL_DIR TOKENS.npy LOGITS.npy

TOKENS.npy holds int token ids [B, S]; LOGITS.npy receives float32 logits [B, S, V]. The model is
loaded in float32 with eager attention, so it is the plainest reference transformers offers.
"""

from __future__ import annotations

import sys

import numpy as np


def load_peer(model_dir: str):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    model = LlamaForCausalLM.from_pretrained(
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
    if len(argv) != 3:
        sys.exit(__doc__)
    model_dir, tokens_path, out_path = argv
    logits = peer_logits(load_peer(model_dir), np.load(tokens_path))
    np.save(out_path, logits.astype(np.float32))


if __name__ == "__main__":
    main(sys.argv[1:])
