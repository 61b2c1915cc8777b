"""Data preparation config (`launch/data.py`); override with --config.x=y. The old flag names
(--domains=..., --tasks=, --bench_batches=N, --notokenize, ...) still work."""

from ml_collections import ConfigDict

from readme_jax.data.corpora import DEFAULT_DOMAINS


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.cache = ""  # "" = $READMEJAX_CACHE_DIR or ~/.cache/readme_jax
    # default names, or name=PATH for a folder of .txt, a .jsonl with a "text" field, or a
    # .parquet with a "text" column
    # "chat" is sampled from the teacher (readme_jax/data/chat.py; settings in c.chat below)
    c.domains = ",".join((*DEFAULT_DOMAINS, "chat"))
    c.split_seed = 0  # seed that assigns documents to splits
    c.validation = 0.05  # fraction of documents held out for validation
    c.test = 0.05  # fraction held out for test
    c.tokenizer = ""  # GGUF file or HF directory for the tokenizer ("" = the SmolLM2 GGUF)
    c.tokenize = True  # tokenize and cache the splits
    c.tasks = "mmlu"  # tasks to fetch (mmlu, or "" for none)
    c.force = False  # rebuild prepared domains even if up to date
    c.bench_batches = 0  # time this many pipeline batches (0: skip)
    c.seq_len = 512  # for bench_batches
    c.batch_size = 8  # for bench_batches
    c.out = ""  # JSON report path ("" = CACHE/data_report.json)
    # the chat domain: conversations the teacher writes in its own chat template (user turns
    # sampled from the template's pre-query prefix, Magpie; answers greedy for the first
    # greedy_tokens, then sampled, LLM-QAT); minutes on 2 CPU cores (docs/results.md)
    c.chat = ConfigDict()
    c.chat.teacher = ""  # GGUF file or HF directory ("" = the SmolLM2 GGUF)
    # 4 batches of 48; about 70% are kept (cut-off or repeated queries are dropped)
    c.chat.conversations = 192
    c.chat.seed = 0
    c.chat.batch_size = 48
    c.chat.query_max_tokens = 64
    c.chat.query_temperature = 1.0
    c.chat.query_top_p = 1.0
    c.chat.answer_max_tokens = 128
    c.chat.greedy_tokens = 4
    c.chat.answer_temperature = 0.7
    c.chat.answer_top_p = 0.9
    c.chat.validation = 0.15
    c.chat.test = 0.15
    return c
