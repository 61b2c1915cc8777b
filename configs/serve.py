"""HTTP server config (launch/serve.py): model, engine choices, limits, network.

python launch/serve.py --config configs/serve.py --config.checkpoint runs/smollm2_135m/moe_init
python launch/serve.py --config.dense=True --config.port=8001      # dense SmolLM2, same engine
python launch/serve.py --config.engine.capacity=0                  # every expert resident
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

# the engine block by path: config files are loaded by path, `configs` need not be importable
_spec = importlib.util.spec_from_file_location(
    "readme_jax_configs_engine", pathlib.Path(__file__).with_name("engine.py")
)
_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine)
get_engine = _engine.get_engine


def get_config():
    c = ConfigDict()
    # model: a Read-ME run or checkpoint directory (holds model.json, or moe_trained/ or
    # moe_init/ inside), a dense .gguf file or Hugging Face directory, "" (bundled SmolLM2,
    # refactored into Read-ME on the fly, or dense with dense=True), or "tiny" (a random 2-layer
    # Read-ME model with the SmolLM2 tokenizer: smoke tests)
    c.checkpoint = ""
    c.dense = False  # serve the dense model itself (with "" or a dense checkpoint)
    c.model_name = ""  # the name /v1/models reports and requests must use ("" = derived)
    # on-the-fly refactoring (no checkpoint and no trained run): the default run config's recipe
    # (configs/smollm2_135m.py; tests/project/test_served.py checks they agree), one expert per
    # domain
    c.domains = "fiction,drama,code_docs,manual,chat"
    c.remain_rate = 0.5
    c.calib_sequences = 16
    c.calib_len = 512
    c.seed = 0
    # engine (readme_jax.serve.engine.EngineConfig; the block and its comments:
    # configs/engine.py): an expert cache of C = 2 slots with Belady and prefetch
    c.engine = get_engine()
    c.engine.capacity = 2
    # admission and shutdown
    c.max_queue = 64  # requests waiting beyond the N slots; more -> 429 with Retry-After
    # Retry-After (seconds): a 503's, and the least of a 429's; a 429's grows with the queue and
    # the recent service time up to retry_after_max_s (serve.http.retry_after_estimate)
    c.retry_after_s = 1
    c.retry_after_max_s = 60
    c.shutdown_grace_s = 10.0  # on SIGTERM: in-flight requests get this long, then cancelled
    c.warmup = True  # compile the steps before accepting requests
    # network
    c.host = "127.0.0.1"
    c.port = 8000
    c.log_level = "info"
    return c
