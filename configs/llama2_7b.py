"""Paper scale: Llama-2-7B-chat refactored over 7 RedPajama domains, the paper's training recipe.

  python launch/train.py --config configs/llama2_7b.py --config.model.checkpoint=/path/to/hf_dir
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python launch/train.py --config configs/llama2_7b.py --config.dry_run=True

The dry run needs no checkpoint: without config.json at model.checkpoint it uses the published
Llama-2-7B shape (HF_SHAPE below).
"""

import importlib.util
import pathlib

# the sibling config by path: config_flags loads this file by path, so `configs` need not be on
# sys.path (launch scripts run from launch/)
_spec = importlib.util.spec_from_file_location(
    "readme_jax_configs_smollm2_135m", pathlib.Path(__file__).with_name("smollm2_135m.py")
)
_smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_smollm2)
_base = _smollm2.get_config

# Llama-2-7b-chat-hf config.json (the fields the dry run needs)
HF_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DOMAINS = ("arxiv", "books", "c4", "common_crawl", "github", "stackexchange", "wikipedia")


def get_config():
    c = _base()
    c.name = "llama2_7b"
    c.run_dir = "runs/llama2_7b"
    c.model.checkpoint = (
        "/data/models/Llama-2-7b-chat-hf"  # HF directory (config.json, *.safetensors)
    )
    c.model.hf_config = HF_SHAPE  # the shape, for --config.dry_run without the checkpoint
    c.model.dtype = "float32"  # f32 master weights; the step computes in bf16 (train.compute_dtype)
    c.model.scan_layers = True  # one compiled layer body; unrolled 32 layers compile slowly
    # RedPajama subsets as JSONL files (one {"text": ...} per line), one expert each
    c.data.domains = ",".join(f"{d}=/data/redpajama/{d}.jsonl" for d in DOMAINS)
    c.data.seq_len = 4096
    c.calib.num_sequences = 16  # 16 x 4096 tokens per domain (paper)
    c.calib.seq_len = 4096
    c.refactor.remain_rate = 0.5
    # the paper's channel score: the OBS score's per-layer Grams would be 8 x F^2 f64 (7.8 GB)
    # and 2 T F^2 = 1.1e14 multiply-adds per layer over the 7 x 16 x 4096 calibration tokens
    c.refactor.score = "magnitude"
    c.router.dim = 512  # paper: 512-wide embedding, 4 heads, MLP 512
    c.router.n_heads = 4
    c.router.ffn_dim = 512
    c.eval.seq_len = 4096

    c.preset = "paper"
    c.train.presets.paper = dict(
        rounds=8,
        router_steps=100,
        expert_steps=200,
        batch_size=128,
        router_batch_size=64,
        seq_len=4096,
        micro_batch=8,
        router_lr=5e-4,
        expert_lr=5e-5,
        save_every=50,
        baselines="layerwise,static",
    )  # ~1.04B tokens: 8 x (100 x 64 + 200 x 128) x 4096
    c.train.expert_params = "backbone"
    c.train.compute_dtype = "bfloat16"
    c.train.remat = True
    c.train.head_chunk = 1024

    c.mesh.data = 1
    c.mesh.fsdp = -1  # all devices: parameters and optimizer state sharded (FSDP)
    c.mesh.expert = 1  # 7 experts: expert parallelism needs 7 | expert
    return c
