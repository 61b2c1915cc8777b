"""Generate text with a dense model (default: the bundled SmolLM2-135M-Instruct) or a Read-ME MoE.

  python launch/generate.py --prompt "What is the capital of France?" --chat
  python launch/generate.py --checkpoint runs/smollm2_135m/moe_trained --prompt "..." --chat \
      --expert_capacity 2 --cache_policy belady     # experts offloaded to host, C=2 on device
  python launch/generate.py --checkpoint path/to/hf_dir --prompt "Once upon a time" \
      --temperature 0.8 --top_p 0.95 --max_new_tokens 64
  python launch/generate.py --checkpoint big_hf_dir --dtype bfloat16 --layout stacked --prompt "..."
      # a model that fills the host: the weights held once
"""

from __future__ import annotations

import sys
import time

from absl import flags

from readme_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "GGUF file or Hugging Face directory (default: SmolLM2).")
flags.DEFINE_string("prompt", None, "Prompt text.", required=True)
flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template.")
flags.DEFINE_integer("max_new_tokens", 128, "Stop after this many new tokens.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_bool(
    "moe",
    None,
    "Serve a Read-ME checkpoint through the serving engine (default: "
    "on when --checkpoint holds a Read-ME MoE).",
)
flags.DEFINE_enum(
    "layout",
    "trimmed",
    ["trimmed", "stacked"],
    "Without the engine: the decode layout (trimmed: fastest, a second copy of the weights; "
    "stacked: the loaded arrays as a scan, the weights held once).",
)
flags.DEFINE_integer("expert_capacity", None, "MoE: expert slots on the device (default: all).")
flags.DEFINE_enum("cache_policy", "belady", ["belady", "lru", "lfu", "random"], "MoE cache policy.")
flags.DEFINE_bool("prefetch", True, "MoE: prefetch the next step's experts.")
flags.DEFINE_integer("max_len", 1024, "MoE: the engine's context per request slot (tokens).")


def main(argv):
    del argv
    import readme_jax as rj
    from readme_jax.checkpoints.tokenizer import prompt_ids
    from readme_jax.model.sampling import SamplingParams

    try:
        sp = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    except ValueError as e:
        sys.exit(f"error: {e}")
    ck = FLAGS.checkpoint
    is_moe = FLAGS.moe
    if is_moe is None:
        is_moe = bool(ck) and _is_readme(ck)
    if is_moe:
        return _generate_moe(sp)
    model = rj.load(ck, dtype=FLAGS.dtype, layout=FLAGS.layout)
    ids = prompt_ids(model.tokenizer, FLAGS.prompt, FLAGS.chat)
    gen = model.generator()
    eos = set(model.cfg.eos_ids)
    out: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    t_first = None
    for step in gen.stream([ids], FLAGS.max_new_tokens, sp, FLAGS.seed):
        t_first = t_first or time.perf_counter()
        tok = int(step[0])
        if tok in eos:
            break
        out.append(tok)
        full = model.tokenizer.decode(out)
        if not full.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(full[len(printed) :])
            sys.stdout.flush()
            printed = full
    t1 = time.perf_counter()
    n = len(out)
    rate = (n - 1) / (t1 - t_first) if n > 1 and t_first else float("nan")
    print(
        f"\n\n[{len(ids)} prompt tokens, {n} generated; first token {t_first - t0:.2f}s "
        f"(incl. compile), then {rate:.1f} tok/s]",
        file=sys.stderr,
    )


def _is_readme(path: str) -> bool:
    """A Read-ME checkpoint, or a run directory holding one (its moe_trained / moe_init)."""
    from readme_jax.serve.model import resolve

    return resolve(path)[0] == "readme"


def _generate_moe(sp) -> None:
    """Read-ME through the serving engine: pre-gated routes, offloaded experts, cache stats."""
    from readme_jax.checkpoints.tokenizer import prompt_ids
    from readme_jax.serve.engine import generate
    from readme_jax.served import load_served

    # no checkpoint: the newest trained run of the default config, else an untrained conversion
    sm = load_served(FLAGS.checkpoint, seed=FLAGS.seed)
    if sm.note:
        print(f"[model] {sm.note}", file=sys.stderr)
    ids = prompt_ids(sm.tokenizer, FLAGS.prompt, FLAGS.chat)
    out_ids: list[int] = []
    printed = [""]

    def on_token(i: int, tok: int) -> None:
        out_ids.append(tok)
        full = sm.tokenizer.decode(out_ids, skip_special=True)
        if not full.endswith("\ufffd"):
            sys.stdout.write(full[len(printed[0]) :])
            sys.stdout.flush()
            printed[0] = full

    max_len = min(FLAGS.max_len, sm.params.rc.model.max_seq_len)
    out = generate(
        sm.params,
        [ids],
        FLAGS.max_new_tokens,
        sp,
        capacity=FLAGS.expert_capacity,
        cache_policy=FLAGS.cache_policy,
        prefetch=FLAGS.prefetch,
        seed=FLAGS.seed,
        max_len=max_len,
        on_token=on_token,
    )
    if out.results[0].error:
        sys.exit(f"error: {out.results[0].error}")
    print("\n\n" + format_stats(out.stats), file=sys.stderr)


def format_stats(stats: dict) -> str:
    """One line of expert-cache statistics for the end of a generation."""
    mb = stats["bytes_moved"] / 1e6
    return (
        f"[expert cache: {stats['policy']}, C={stats['capacity']} of E={stats['num_experts']}"
        f"{', prefetch' if stats.get('prefetch') else ''}; {stats['hits']} hits, "
        f"{stats['misses']} misses (hit ratio {100 * stats['hit_ratio']:.1f}%), {stats['loads']} "
        f"loads = {mb:.1f} MB moved ({stats['bytes_per_token'] / 1e6:.2f} MB/token); "
        f"{stats['steps']} steps, decode {stats['decode_tok_s']:.1f} tok/s]"
    )


if __name__ == "__main__":
    cli.run(main)
