"""Hugging Face Llama-family checkpoint directories: load into our parameter tree, and save back.

A directory holds `config.json` plus one `model.safetensors`, or several shards listed in
`model.safetensors.index.json`. HF Linear weights are [out, in]; ours are applied as x @ W, so
they are transposed, and q/k/v are stacked into `wqkv` [L, D, H + 2K, hd] (HF's rotate-half q/k
layout is kept, no un-permuting).

Safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian
data) rather than through `safetensors.safe_open(framework="numpy")`, which cannot return bf16;
parsing ourselves also lets every truncated or corrupt file get an error naming file and tensor.

Peak host memory while loading is bounded by: the finished parameter groups already handed to
JAX (on an accelerator these live in device memory) + the one stacked group being filled, in the
target dtype (the largest is `w_gate_up`, 2/3 of the layer weights) + one tensor as read from
disk, written into the group through a view (no second temporary). Groups are filled one at a
time by random access into the files, and each is handed to JAX and dropped before the next
starts, so the model never sits in host RAM twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.tokenizer import hf_end_ids
from readme_jax.model.config import ConfigError, LlamaConfig
from readme_jax.model.llama import param_shapes

Params = dict[str, Any]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces

# Safetensors dtype codes -> numpy dtypes (little-endian, as the format specifies).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")
_NP_TO_ST = {
    np.dtype("float32"): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype("float16"): "F16",
    np.dtype("float64"): "F64",
}
# Tensors some exporters write that carry nothing we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raise CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file: the header claims {n} "
                    f"bytes but the file has {size} bytes"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            itemsize = _ST_DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}"
            ) from e
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} has shape {list(shape)} "
                f"{dtype} but data_offsets [{begin}, {end}]"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} needs data bytes up to "
                f"{end} but the file holds only {data_size} after its header"
            )
        out[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    return out


def read_tensor(info: TensorInfo, f=None) -> np.ndarray:
    """Read one tensor's bytes (from the open file `f` if given) as a numpy array."""
    if f is None:
        with open(info.file, "rb") as g:
            return read_tensor(info, g)
    buf = np.empty(info.nbytes, np.uint8)
    f.seek(info.offset)
    if f.readinto(buf) != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor data")
    return buf.view(_ST_DTYPES[info.dtype]).reshape(info.shape)


# --- directory and config --------------------------------------------------------------------


def _tensor_index(root: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, by name, from the index file or all *.safetensors."""
    index = root / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index file ({e!r})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        weight_map = None
        if not files:
            other = sorted(p.name for p in root.glob("*.bin")) + sorted(
                p.name for p in root.glob("*.pth")
            )
            hint = f" (found {other}: convert them to safetensors)" if other else ""
            raise CheckpointError(f"{root}: no *.safetensors weight files{hint}")
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        for name, info in read_safetensors_header(root / fname).items():
            if weight_map is not None and weight_map.get(name) != fname:
                continue
            if name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {name!r} appears in both {tensors[name].file.name} and {fname}"
                )
            tensors[name] = info
    if weight_map is not None:
        absent = sorted(n for n in weight_map if n not in tensors)
        if absent:
            raise CheckpointError(
                f"{index} maps tensors to shards that do not hold them: {_names(absent)}"
            )
    return tensors


def _read_config(root: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], LlamaConfig]:
    path = root / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{root}: no config.json; a Hugging Face model directory needs config.json "
            "and *.safetensors"
        )
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    window = hf.get("sliding_window")
    if (
        isinstance(window, int)
        and hf.get("use_sliding_window", True)
        and "max_seq_len" not in overrides
    ):
        # Mistral-style sliding-window attention equals full attention up to the window, so
        # capping the context keeps such checkpoints exact instead of silently wrong.
        overrides["max_seq_len"] = min(window, hf.get("max_position_embeddings", window))
    if "eos_ids" not in overrides:  # every end id declared anywhere in the directory
        overrides["eos_ids"] = hf_end_ids(root)
    try:
        cfg = LlamaConfig.from_hf(hf, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{path}: missing required field {e}") from e
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "hidden_act": hf.get("hidden_act", "silu") not in ("silu", "swish"),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"{path}: unsupported Llama variant ({', '.join(f'{k}={hf.get(k)!r}' for k in bad)}); "
            "readme_jax implements bias-free SwiGLU Llama models"
        )
    return hf, cfg


# --- name mapping ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One HF tensor and where it lands in our tree: params[group...][index] (transposed?)."""

    hf_name: str
    hf_shape: tuple[int, ...]
    group: tuple[str, ...]
    index: tuple[Any, ...]
    transpose: bool


def _slots(cfg: LlamaConfig) -> list[_Slot]:
    D, F, V, hd = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, K = cfg.n_heads, cfg.n_kv_heads
    S_ = slice(None)
    slots = [_Slot("model.embed_tokens.weight", (V, D), ("embed",), (), False)]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        slots += [
            _Slot(p + "input_layernorm.weight", (D,), ("layers", "attn_norm"), (i,), False),
            _Slot(
                p + "self_attn.q_proj.weight",
                (H * hd, D),
                ("layers", "wqkv"),
                (i, S_, slice(0, H)),
                True,
            ),
            _Slot(
                p + "self_attn.k_proj.weight",
                (K * hd, D),
                ("layers", "wqkv"),
                (i, S_, slice(H, H + K)),
                True,
            ),
            _Slot(
                p + "self_attn.v_proj.weight",
                (K * hd, D),
                ("layers", "wqkv"),
                (i, S_, slice(H + K, H + 2 * K)),
                True,
            ),
            _Slot(p + "self_attn.o_proj.weight", (D, H * hd), ("layers", "wo"), (i,), True),
            _Slot(p + "post_attention_layernorm.weight", (D,), ("layers", "mlp_norm"), (i,), False),
            _Slot(p + "mlp.gate_proj.weight", (F, D), ("layers", "w_gate_up"), (i, S_, 0), True),
            _Slot(p + "mlp.up_proj.weight", (F, D), ("layers", "w_gate_up"), (i, S_, 1), True),
            _Slot(p + "mlp.down_proj.weight", (D, F), ("layers", "w_down"), (i,), True),
        ]
    slots.append(_Slot("model.norm.weight", (D,), ("final_norm",), (), False))
    if not cfg.tie_embeddings:
        slots.append(_Slot("lm_head.weight", (V, D), ("lm_head",), (), True))
    return slots


def _names(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_tensors(root: Path, cfg: LlamaConfig, slots: list[_Slot], tensors) -> None:
    """Fail before reading any data if names or shapes disagree with the config."""
    wanted = {s.hf_name for s in slots}
    missing = [s.hf_name for s in slots if s.hf_name not in tensors]
    if missing:
        raise CheckpointError(f"{root}: checkpoint is missing tensors: {_names(missing)}")
    ignorable = set() if not cfg.tie_embeddings else {"lm_head.weight"}
    extra = sorted(
        n
        for n in tensors
        if n not in wanted and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES)
    )
    if extra:
        raise CheckpointError(
            f"{root}: checkpoint has tensors the config does not account for (config.json "
            f"says {cfg.n_layers} layers; wrong config?): {_names(extra)}"
        )
    for s in slots:
        info = tensors[s.hf_name]
        if info.shape != s.hf_shape:
            raise CheckpointError(
                f"{info.file}: tensor {s.hf_name} has shape {list(info.shape)} but config.json "
                f"implies {list(s.hf_shape)}; do config.json and the weights belong together?"
            )
        if info.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {s.hf_name} has dtype {info.dtype}; only "
                f"{', '.join(_WEIGHT_DTYPES)} weights are supported (quantized checkpoints are not)"
            )


# --- load ------------------------------------------------------------------------------------


def _np_dtype(dtype: Any) -> np.dtype:
    name = np.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {name}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def _fill_group(shape, dtype, slots: list[_Slot], tensors, handles) -> np.ndarray:
    out = np.empty(shape, dtype)
    for s in slots:
        info = tensors[s.hf_name]
        f = handles.get(info.file)
        if f is None:
            f = handles[info.file] = open(info.file, "rb")
        w = read_tensor(info, f)
        # Write through a view of the destination in HF's layout (copy=False raises rather than
        # silently reshaping a copy), so the cast and transpose need no temporary.
        if s.transpose:
            out[s.index].reshape(s.hf_shape[::-1], copy=False).T[...] = w
        else:
            out[s.index].reshape(s.hf_shape, copy=False)[...] = w
    return out


def _groups(shapes: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in shapes.items():
        if isinstance(v, dict):
            yield from _groups(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def load_hf(
    path: str | Path,
    dtype: Any = None,
    cfg_overrides: dict[str, Any] | None = None,
    shardings: Any = None,
) -> tuple[LlamaConfig, Params]:
    """Load a Hugging Face Llama-family directory as (config, params).

    dtype: parameter dtype ("float32" / "bfloat16" or a numpy/jax dtype); default cfg.dtype.
    shardings: optional `jax.sharding.Sharding`, or a tree like params of them, for device_put.
    Raises CheckpointError (missing, truncated, corrupt or mismatched files) or ConfigError
    (unsupported architecture or variant), each naming the file and the problem.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: not a directory; expected a Hugging Face model directory "
            "(config.json + *.safetensors)"
        )
    overrides = dict(cfg_overrides or {})
    if dtype is not None:
        overrides["dtype"] = _np_dtype(dtype).name
    _, cfg = _read_config(root, overrides)
    np_dtype = _np_dtype(cfg.dtype)
    tensors = _tensor_index(root)
    slots = _slots(cfg)
    _check_tensors(root, cfg, slots, tensors)

    params: Params = {}
    handles: dict[Path, Any] = {}
    try:
        for group, shape in _groups(param_shapes(cfg)):
            group_slots = [s for s in slots if s.group == group]
            arr = _fill_group(shape, np_dtype, group_slots, tensors, handles)
            sharding = shardings
            for k in group if isinstance(shardings, dict) else ():
                sharding = sharding[k]
            node = params
            for k in group[:-1]:
                node = node.setdefault(k, {})
            node[group[-1]] = jax.device_put(arr, sharding)
            del arr  # the device copy is now the only one
    finally:
        for f in handles.values():
            f.close()
    return cfg, params


# --- save ------------------------------------------------------------------------------------


def hf_config_dict(cfg: LlamaConfig) -> dict[str, Any]:
    """A transformers-loadable `config.json` for cfg (legacy rope_scaling form, read by v4/v5)."""
    rs = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _hf_rope_scaling(rs),
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0],
        "torch_dtype": cfg.dtype,
    }


def _hf_rope_scaling(rs) -> dict[str, Any] | None:
    """config.json's rope_scaling for cfg.rope_scaling; GGUF freq_factors have no HF form."""
    if rs is None:
        return None
    if rs.rope_type == "linear":
        return {"rope_type": "linear", "factor": rs.factor}
    if rs.rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"rope_type": "llama3", **{k: getattr(rs, k) for k in keys}}
    raise ConfigError(
        f"RoPE scaling {rs.rope_type!r} (a GGUF's rope_freqs.weight) has no config.json form"
    )


def _write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype, Any]]
) -> None:
    """Stream tensors to `path`; entries are (name, shape, dtype, producer of the array)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _NP_TO_ST[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape, dtype, produce in entries:
            a = np.ascontiguousarray(produce(), dtype=dtype.newbyteorder("<"))
            assert a.shape == shape, (a.shape, shape)
            a.tofile(f)
    os.replace(tmp, path)  # a crash mid-write leaves any previous file intact


def save_hf(
    path: str | Path, cfg: LlamaConfig, params: Params, max_shard_bytes: int | None = None
) -> Path:
    """Write params as a Hugging Face Llama directory that `load_hf` and transformers read.

    Tensors are pulled from the device and written one at a time, in the params' dtype. With
    max_shard_bytes set and exceeded, shards and `model.safetensors.index.json` are written.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)

    def group_array(s: _Slot):
        node = params
        for k in s.group:
            node = node[k]
        return node

    def entry(s: _Slot):
        def produce():
            a = np.asarray(group_array(s)[s.index])
            return a.reshape(s.hf_shape[::-1]).T if s.transpose else a.reshape(s.hf_shape)

        return (s.hf_name, s.hf_shape, np.dtype(group_array(s).dtype), produce)

    _write_shards(root, [entry(s) for s in _slots(cfg)], max_shard_bytes)
    (root / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    return root


def _write_shards(root: Path, entries: list[tuple], max_shard_bytes: int | None) -> None:
    """Write entries (name, shape, dtype, producer) as one file or as shards + the index."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[1]) * e[2].itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    names = (
        [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    stale = sorted(p.name for p in root.glob("*.safetensors") if p.name not in names)
    if stale:
        raise CheckpointError(f"{root}: refusing to save next to other weight files {stale}")
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        _write_safetensors(root / fname, shard)
        for name, shape, dtype, _ in shard:
            weight_map[name] = fname
            total += math.prod(shape) * dtype.itemsize
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2))
    else:
        (root / INDEX_NAME).unlink(missing_ok=True)


def write_hf(
    path: str | Path,
    cfg: LlamaConfig,
    tensor_fn: Any,
    max_shard_bytes: int | None = 5 * 10**9,
) -> Path:
    """Write a Hugging Face Llama directory whose tensors come one at a time from
    `tensor_fn(hf_name, hf_shape)` (an array in HF's [out, in] layout, cast to cfg.dtype), in
    HF's order (embeddings, then layer by layer), sharded at max_shard_bytes as transformers
    shards. Host memory holds one tensor at a time, so writing a model larger than RAM works.
    Raises CheckpointError next to other weight files."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    dt = _np_dtype(cfg.dtype)
    entries = [
        (s.hf_name, s.hf_shape, dt, lambda s=s: tensor_fn(s.hf_name, s.hf_shape))
        for s in _slots(cfg)
    ]
    _write_shards(root, entries, max_shard_bytes)
    (root / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    return root
