"""HTTP server config (launch/serve.py): model, engine choices, limits, network.

python launch/serve.py --config configs/serve.py --config.checkpoint runs/smollm2_135m/moe_init
python launch/serve.py --config.dense=True --config.port=8001      # dense SmolLM2, same engine
"""

from ml_collections import ConfigDict


def get_config():
    c = ConfigDict()
    # model: a Read-ME run or checkpoint directory (holds model.json, or moe_trained/ or
    # moe_init/ inside), a dense .gguf file or Hugging Face directory, "" (bundled SmolLM2,
    # refactored into Read-ME on the fly, or dense with dense=True), or "tiny" (a random 2-layer
    # Read-ME model with the SmolLM2 tokenizer: smoke tests)
    c.checkpoint = ""
    c.dense = False  # serve the dense model itself (with "" or a dense checkpoint)
    c.model_name = ""  # the name /v1/models reports and requests must use ("" = derived)
    c.domains = "fiction,drama,code_docs,manual"  # on-the-fly refactoring: one expert each
    c.remain_rate = 0.5
    c.calib_sequences = 4
    c.calib_len = 256
    c.seed = 0
    # engine (readme_jax.serve.engine.EngineConfig)
    c.batching = "expert"  # expert | cache (cache-aware expert batching) | decode | prefill
    c.cache_policy = "belady"  # belady | lru | lfu | random | all
    c.capacity = 2  # C expert slots on the device (0 = all E resident)
    c.prefetch = True
    c.num_slots = 8  # N request slots
    c.max_len = 1024  # context per request: prompt + max_tokens
    c.prefill_chunk = 32
    c.max_batch_tokens = 128  # token budget per step (prefill tokens + decode rows)
    c.max_wait = 32  # fairness bound in steps
    # expert cap of expert/cache batching: a batch adds no new expert once it needs this many
    # (0 = off, Algorithm 1 as in the paper; serve.batching module doc)
    c.max_experts = 0
    # all experts resident and nothing waiting: dispatch the next decode step before reading
    # this one (EngineConfig.lookahead; outputs are the same either way)
    c.lookahead = True
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
