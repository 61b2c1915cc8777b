"""Default: SmolLM2-135M-Instruct (bundled GGUF) refactored over the four default domains.

python launch/train.py --config configs/smollm2_135m.py [--config.key=value ...]
python launch/train.py --config configs/smollm2_135m.py:eight   # eight domains, eight experts
"""

from ml_collections import ConfigDict, config_dict

# data.corpora.DOMAIN_PRESETS, spelled out so that a config file imports nothing heavy
DOMAINS = {
    "four": "fiction,drama,code_docs,manual",
    "eight": "fiction,drama,code_docs,manual,scripture,man_pages,perl_docs,sql_docs",
}


def get_config(variant: str = "") -> ConfigDict:
    """`variant`: "" (four domains) or "eight" (one expert per domain of the eight)."""
    if variant not in ("", *DOMAINS):
        raise ValueError(f"unknown config variant {variant!r}; choose '' or one of {list(DOMAINS)}")
    c = ConfigDict()
    c.name = "smollm2_135m" + (f"_{variant}" if variant else "")
    c.run_dir = f"runs/{c.name}"
    c.stages = "calibrate,refactor,train,eval"  # any subset, in this order
    c.seed = 0
    c.preset = "demo"  # demo | compare | full: token budgets of training (see train.presets)
    c.dry_run = False
    c.resume = True
    c.multihost = False  # True: jax.distributed.initialize() with JAX's cluster auto-detection
    # multi-process runs (readme_jax/train/distributed.py; README "Multi-process training")
    c.distributed = ConfigDict()
    c.distributed.coordinator = ""  # "host:port" of process 0; "" = auto-detect or one process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.cpu_devices = 0  # CPU devices per process (jax_num_cpu_devices); 0 = default
    c.distributed.init_timeout_s = 300

    c.model = ConfigDict()
    c.model.checkpoint = ""  # "" = bundled SmolLM2 GGUF; or a .gguf file / HF directory
    c.model.dtype = "float32"
    c.model.scan_layers = False
    # calibrate/refactor read a Hugging Face checkpoint's layers one at a time from its files
    # (memory of one layer, not the model: paper-width conversions on one host; domain experts)
    c.model.layers_on_disk = False

    c.data = ConfigDict()
    # domain names, or name=/path (folder of .txt, .jsonl, .parquet). "chat": conversations the
    # teacher writes in its chat template (launch/data.py samples them; data/chat.py), its own
    # expert; without it the converted model stops answering in the chat format
    c.data.domains = DOMAINS[variant or "four"] + ",chat"
    # domains trained on (and evaluated) without an expert of their own: their tokens are routed
    # by the coverage target (Eq. 4) to the experts of c.data.domains, e.g. "chat" here with
    # domains = the four text domains ("chat spread over the experts")
    c.data.extra_domains = ""
    # mixture weights of the training batches, "name=w,..." (unnamed domains: 1); "" = uniform
    c.data.weights = ""
    c.data.cache = ""  # "" = $READMEJAX_CACHE_DIR or ~/.cache/readme_jax
    c.data.seq_len = 512

    c.calib = ConfigDict()
    c.calib.num_sequences = 16
    c.calib.seq_len = 512
    c.calib.split = "train"

    c.refactor = ConfigDict()
    c.refactor.remain_rate = 0.5
    c.refactor.clustering = False  # True: experts from k-means clusters of token activations
    c.refactor.num_clusters = 0  # 0 = as many as domains
    # clustering unit: 0 = tokens; N > 0 = N-token context chunks (refactor/cluster.py:
    # chunk_assign; route them with train.target_prefix=True)
    c.refactor.cluster_chunk = 0
    # with clustering: a Read-ME model directory (e.g. an earlier run's moe_router) whose trained
    # router groups the calibration tokens instead of k-means; the experts are built around the
    # router's partition, refit on it, and the model starts from that router
    c.refactor.cluster_router = ""
    # with clustering: N > 0 trains the router first, N router steps over k-means clusters in
    # RUN/route/, then builds the experts around its partition (cluster_router) and trains them
    # with the router frozen (train/router_first.py; measured in docs/results.md §2)
    c.refactor.router_first_steps = 0
    # expert construction (refactor/construct.py; docs/logbook/construction.md): the channel
    # score ("magnitude" = mean |h|, the paper's; "frequency" = activation rate, CMoE's; "obs" =
    # the output error its removal leaves after the refit, ZipLM's structured OBS), the
    # shared rule ("intersection" of the experts' top sets, the paper's; "core" = the top
    # shared_frac of the kept channels by the pooled score) and, with "core", the experts
    # ("overlap" = each group's own top channels; "partition" = disjoint, balanced)
    # default "obs": before training Read-ME 33.29 -> 31.61 on the default domains, after 24,576
    # expert tokens 30.27 -> 29.02 (router-built experts), static pruning 33.03 -> 31.43
    # (docs/logbook/construction.md, "Channels chosen by the error they leave")
    c.refactor.score = "obs"
    c.refactor.shared = "intersection"
    c.refactor.experts = "overlap"
    c.refactor.shared_frac = 0.5
    # refit each layer's down projection over the kept channels by ridge least squares on the
    # calibration tokens (refactor/reconstruct.py); the static baseline gets the same refit.
    # "lstsq" or "none"; ridge: lam / mean diagonal of the Gram term. On by default: at the
    # `compare` budget (docs/logbook/training-recipe.md §7c) Read-ME 45.39 -> 37.55 ppl,
    # static pruning 44.53 -> 33.76 at equal tokens; "none" = channel selection only (the paper)
    c.refactor.reconstruct = "lstsq"
    c.refactor.ridge = 1e-2
    c.refactor.calib_sequences = 8  # calibration rows per domain for the refit; 0 = all
    # layer-local distillation after the refit (refactor/local_distill.py): each layer's MoE FFN
    # matches the dense FFN's output on cached teacher activations (MSE); 0 steps = off
    c.refactor.local_steps = 0
    c.refactor.local_tokens = 2048  # cached tokens per domain (calibration rows)
    c.refactor.local_batch = 256  # tokens per domain per step
    c.refactor.local_lr = 1e-4

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
    # held-out tokens per domain (the first N of each validation split, the same for every
    # model); 32768 for careful comparisons (manual has 14.6k in all); the demo keeps 4096
    c.eval.max_tokens_per_domain = 4096
    c.eval.batch_size = 4
    c.eval.mmlu_limit = 1  # questions per subject (57 subjects); 0 = skip MMLU
    c.eval.skip_models = "moe_router"  # run subdirectories not to evaluate
    c.eval.mmlu_shots = "0"  # e.g. "0,5"
    # skills (eval/skills.py): assistant-token KL / top-1 on held-out teacher conversations (when
    # "chat" is a domain) and the answer test (greedy chat answers to eval/data/questions.jsonl)
    c.eval.skills = True
    c.eval.chat_len = 256  # tokens per held-out conversation (cut)
    c.eval.answer_tokens = 48  # new tokens per answer; 0 = no answer test
    c.eval.questions = ""  # "" = the project's question set; or a JSONL of the same form
    # Training (readme_jax/train): keys left at None come from train.presets[c.preset].
    c.train = ConfigDict()
    c.train.rounds = config_dict.placeholder(int)
    c.train.router_steps = config_dict.placeholder(int)  # paper: 100 (batch 64 x 4096)
    c.train.expert_steps = config_dict.placeholder(int)  # paper: 200 (batch 128 x 4096)
    c.train.batch_size = config_dict.placeholder(int)  # global sequences per expert step
    c.train.router_batch_size = config_dict.placeholder(int)  # 0 = batch_size
    c.train.seq_len = config_dict.placeholder(int)
    c.train.router_lr = config_dict.placeholder(float)  # paper: 5e-4
    c.train.expert_lr = config_dict.placeholder(float)  # paper: 5e-5
    c.train.save_every = config_dict.placeholder(int)  # checkpoint every N steps (and phase ends)
    c.train.baselines = config_dict.placeholder(str)  # "layerwise,static" (same data and tokens)
    c.train.micro_batch = config_dict.placeholder(int)  # grad accumulation; 0 = whole batch
    c.train.lr_decay = 0.8  # peak LR x0.8 per round
    c.train.warmup_frac = 0.0
    c.train.min_lr_frac = 0.1
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0
    c.train.expert_params = "ffn"  # "ffn" or "backbone" (everything but the router)
    c.train.lm_weight = 1.0  # expert phase: lm_weight * CE + kd_weight * KL(teacher || student)
    c.train.kd_weight = 1.0
    c.train.temperature = 1.0
    c.train.target_top_frac = 0.5  # routing target: a token's top-50% dense channels (Eq. 4)
    c.train.target_shared = True  # count the shared expert's channels too (shared ∪ private)
    # < 1 sharpens the routing target, p ∝ counts^(1/T); 1 = Eq. 4 as in the paper. With the
    # shared channels counted, the Eq. 4 target is within ~0.01 nats of uniform here, and the
    # router learns little from it: a router-only probe (12 x 1024 tokens) took the MoE from
    # 132 to 103 mean ppl with T=1 and to 80 with T=0.05 (domain-oracle routing: ~76).
    c.train.target_temperature = 0.05
    # router target moved towards the document's domain label: (1 - w) * target + w * one-hot
    # (train.losses.mix_domain_target); 0 = the paper's target. Needs domain experts: set it to
    # 0 with refactor.clustering. Measured (docs/logbook/training-recipe.md §7d, compare budget,
    # 24 router steps):
    # 35.06 -> 33.85 ppl, temporal locality 68% -> 96%, within 1% of domain-oracle routing.
    c.train.domain_target = 1.0
    # the coverage counts summed over each token's causal prefix within its document (losses.
    # prefix_counts): the target of context-clustered experts (refactor.cluster_chunk > 0)
    c.train.target_prefix = False
    # router phase: + locality_weight * mean switch (total variation of the router's distribution
    # between consecutive tokens of a document, train.losses.switch_penalty); 0 = off (paper)
    c.train.locality_weight = 0.0
    c.train.head_chunk = 512  # tokens per LM-head chunk (the [T, V] logits never exist at once)
    c.train.compute_dtype = "float32"  # or "bfloat16" (f32 master weights)
    # MoE dispatch while training: "auto" = blocked on CPU, the model's (ragged) elsewhere
    c.train.dispatch = "auto"
    c.train.remat = False
    c.train.keep = 3
    c.train.stop_after = 0  # debug: end after N steps as if killed
    c.train.save_router_snapshot = True
    # each trained model saved also at these expert-phase token counts (comma-separated; 0 =
    # the starting point) as RUN/snapshots/<model>_<tokens>/, evaluated with the others: the
    # points of a quality-vs-tokens curve from one run (`launch/compare.py`). A rerun of a
    # finished run with new counts exports them from the train-state checkpoints still kept.
    c.train.snapshots = ""
    c.train.num_threads = 2
    # fmt: off
    c.train.presets = ConfigDict({
        # ~6.5 min of training on 2 CPU cores: 2 rounds x (12 router + 8 expert) x 1024 tokens
        # (router steps are ~4x cheaper than expert steps and buy routing quality,
        # docs/logbook/training-recipe.md §7d)
        "demo": dict(rounds=2, router_steps=12, expert_steps=8, batch_size=4, seq_len=256,
                     router_lr=2e-3, expert_lr=2e-4, save_every=4, baselines="",
                     router_batch_size=0, micro_batch=0),
        # equal-token comparison with the baselines on a 2-core CPU (~40 min per remain rate):
        # 2 rounds x (24 router + 12 expert) x 1024 tokens; `make compare` runs it at 0.5 and 0.75
        "compare": dict(rounds=2, router_steps=24, expert_steps=12, batch_size=4, seq_len=256,
                        router_lr=2e-3, expert_lr=2e-4, save_every=6, baselines="layerwise,static",
                        router_batch_size=0, micro_batch=0),
        # real results (hours on CPU): 4 rounds x (25 + 50 steps) x 4096 tokens = 1.2M tokens
        "full": dict(rounds=4, router_steps=25, expert_steps=50, batch_size=8, seq_len=512,
                     router_lr=1e-3, expert_lr=1e-4, save_every=10, baselines="layerwise,static",
                     router_batch_size=0, micro_batch=0),
    })
    # fmt: on

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp/expert
    c.mesh.fsdp = 1
    c.mesh.expert = 1
    return c
