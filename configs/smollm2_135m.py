"""Default: SmolLM2-135M-Instruct (bundled GGUF) refactored over the four default domains.

  python launch/train.py --config configs/smollm2_135m.py [--config.key=value ...]
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "smollm2_135m"
    c.run_dir = "runs/smollm2_135m"
    c.stages = "calibrate,refactor,train,eval"  # any subset, in this order
    c.seed = 0
    c.preset = "demo"  # demo | full: token budgets of training (see train.*)
    c.dry_run = False
    c.resume = True
    c.multihost = False

    c.model = ConfigDict()
    c.model.checkpoint = ""  # "" = bundled SmolLM2 GGUF; or a .gguf file / HF directory
    c.model.dtype = "float32"
    c.model.scan_layers = False

    c.data = ConfigDict()
    c.data.domains = "fiction,drama,code_docs,manual"  # name or name=/path (txt dir, jsonl, parquet)
    c.data.cache = ""  # "" = $READEME_CACHE or ~/.cache/readme_jax
    c.data.seq_len = 512

    c.calib = ConfigDict()
    c.calib.num_sequences = 16
    c.calib.seq_len = 512
    c.calib.split = "train"

    c.refactor = ConfigDict()
    c.refactor.remain_rate = 0.5

    c.moe = ConfigDict()
    c.moe.top_k = 1
    c.moe.gate_scaling = False
    c.moe.dispatch = "ragged"

    c.router = ConfigDict()
    c.router.dim = 128
    c.router.n_heads = 4
    c.router.ffn_dim = 256

    c.eval = ConfigDict()
    c.eval.split = "validation"
    c.eval.seq_len = 512
    c.eval.max_tokens_per_domain = 16384
    c.eval.batch_size = 4
    return c
