"""Tiny random-weight config for tests: the whole pipeline in seconds."""

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


def get_config():
    c = _base()
    c.name = "tiny"
    c.run_dir = "runs/tiny"
    c.model.checkpoint = "random:vocab=49152,dim=32,layers=2,heads=4,kv_heads=2,ffn=64"
    c.calib.num_sequences = 2
    c.calib.seq_len = 64
    c.data.seq_len = 64
    c.router.dim = 16
    c.router.n_heads = 2
    c.router.ffn_dim = 32
    c.eval.seq_len = 64
    c.eval.max_tokens_per_domain = 256
    c.eval.mmlu_limit = 0
    c.train.head_chunk = 128
    tiny = dict(
        rounds=2,
        router_steps=2,
        expert_steps=2,
        batch_size=4,
        seq_len=64,
        router_lr=1e-2,
        expert_lr=1e-3,
        save_every=2,
    )
    c.train.presets.demo.update(tiny)
    c.train.presets.full.update(tiny)
    return c
