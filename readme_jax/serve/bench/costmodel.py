"""A simulated accelerator: step times of the engine's schedule from a documented cost model.

On CPU, host and device memory are the same RAM, so expert loads are memcpys and the paper's
latency experiment (an A100 whose experts sit behind PCIe) cannot be measured. `CostClock` gives
the engine each step's duration from the step record (its calls, their tokens, context, experts
and loads) instead of the wall clock; run it with `ReplayBackend` to re-time a recorded run.

Model (per call: a decode over some rows, or one prefill chunk with all its waves):
  compute = launch + max(flops / (peak_flops * flop_eff), bytes / (hbm_bw * mem_eff))
     bytes = dense weights (attention, shared expert, norms, router, LM head) read once per call
             + the call's experts' weights + the KV cache read (context tokens of its rows);
             matmul weights in the model's form (`ModelCost.quant`: int8 = 1 byte per weight
             + an f32 scale per output channel, as model/quant.py stores them), so an int8
             expert is both a quarter of the bytes to load and to read;
     flops = 2 * tokens * (dense + K expert params per layer) + 4 * context * H * hd per layer
             + 2 * D * V per sampled row.
  load    = demand loads * bytes_per_expert / link_bw.
  on-demand: a call's loads, then its compute (serial).
  prefetch:  layer-pipelined (the load of layer l+1 overlaps the compute of layer l):
             load/L + (L-1)/L * max(load, compute) + compute/L; plus the engine's cross-step
             prefetches, which stream during the step and delay the next step's demand loads
             only while the link is still busy.
Profiles: datasheet bandwidths and bf16 peaks with assumed efficiencies (mem 0.7, flops 0.5)
and a per-layer launch overhead of 40 us; the host link is the effective rate of PCIe 4.0 x16
(~25 GB/s, A100) or PCIe 5.0 x16 (~50 GB/s, H200). `fit_cpu` calibrates a CPU profile from
measured step times by non-negative least squares, which checks the model's form (its R^2 is
reported) and gives the measured CPU constants.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bw: float  # bytes/s, device memory
    peak_flops: float  # FLOP/s at the serving dtype
    link_bw: float  # bytes/s, host -> device (effective)
    launch_s: float  # fixed cost per forward call (kernel launches, per model)
    mem_eff: float = 0.7
    flop_eff: float = 0.5
    step_s: float = 0.0  # fixed host cost per engine step (scheduling, dispatch)


def a100_pcie4(layers: int) -> Hardware:
    """A100 40GB PCIe: 1.555 TB/s HBM2, 312 TFLOP/s bf16, PCIe 4.0 x16 ~25 GB/s effective."""
    return Hardware("A100 (PCIe 4.0 x16)", 1.555e12, 312e12, 25e9, 40e-6 * layers)


def h200(layers: int) -> Hardware:
    """H200: 4.8 TB/s HBM3e, 989 TFLOP/s bf16, PCIe 5.0 x16 ~50 GB/s effective."""
    return Hardware("H200 (PCIe 5.0 x16)", 4.8e12, 989e12, 50e9, 40e-6 * layers)


PROFILES = {"a100": a100_pcie4, "h200": h200}


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Byte and FLOP counts of one Read-ME model in its serving layout."""

    name: str
    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn: int  # dense FFN width the experts were cut from
    shared_width: int  # Fs
    expert_width: int  # Fe (padded, as computed)
    dtype_bytes: int = 4
    top_k: int = 1
    other_params: int = 0  # router and anything else read once per call
    quant: str = "none"  # matmul weights' form (model/quant.py); norms, router, KV keep dtype

    def weight_bytes(self, params: int, channels: int) -> int:
        """Bytes of matmul weights (`params` of them, `channels` output channels) in `quant`'s
        form: int8 values with an f32 scale per channel, bf16, or dtype_bytes each."""
        if self.quant.startswith("int8"):
            return params + 4 * channels
        return params * (2 if self.quant == "bf16" else self.dtype_bytes)

    @property
    def attn_layer_params(self) -> int:
        hd = self.head_dim
        return self.dim * (self.heads + 2 * self.kv_heads) * hd + self.heads * hd * self.dim

    @property
    def expert_layer_params(self) -> int:
        return 3 * self.dim * self.expert_width

    @property
    def dense_layer_params(self) -> int:
        return self.attn_layer_params + 3 * self.dim * self.shared_width

    @property
    def dense_params(self) -> int:
        """Read once per call: attention, shared expert, norms, LM head (tied), router."""
        per_layer = self.dense_layer_params + 2 * self.dim
        return self.layers * per_layer + self.vocab * self.dim + self.other_params

    @property
    def dense_bytes(self) -> int:
        """Bytes of `dense_params`: the matmul weights in `quant`'s form, the rest in dtype."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        channels = self.layers * (qkv + self.dim + 2 * self.shared_width + self.dim) + self.vocab
        matmul = self.layers * self.dense_layer_params + self.vocab * self.dim
        rest = self.dense_params - matmul  # norms and router
        return self.weight_bytes(matmul, channels) + rest * self.dtype_bytes

    @property
    def bytes_per_expert(self) -> int:
        """One expert as it is loaded and read (every layer's gate/up and down)."""
        channels = self.layers * (2 * self.expert_width + self.dim)
        return self.weight_bytes(self.layers * self.expert_layer_params, channels)

    def experts_in(self, device_bytes: float) -> int:
        """How many experts `device_bytes` of expert memory holds (the cache capacity C)."""
        return int(device_bytes // self.bytes_per_expert)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def call_bytes(self, call: dict) -> float:
        return (
            self.dense_bytes
            + len(call["experts"]) * self.bytes_per_expert
            + call["context"] * self.kv_bytes_per_token
        )

    def call_flops(self, call: dict) -> float:
        per_tok = self.layers * (self.dense_layer_params + self.top_k * self.expert_layer_params)
        attn = 4 * call["context"] * self.heads * self.head_dim * self.layers
        rows = call["tokens"] if call["kind"] == "decode" else 1  # rows that get logits
        return 2 * call["tokens"] * per_tok + attn + 2 * rows * self.dim * self.vocab

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "bytes_per_expert": self.bytes_per_expert,
            "dense_bytes": self.dense_bytes,
        }


def model_cost(sp, name: str = "served model") -> ModelCost:
    """Counts of a `decode.ServeParams` (its real shapes, dtype and weight form)."""
    cfg = sp.rc.model
    router = sum(int(np.size(x)) for x in _leaves(sp.router))
    return ModelCost(
        name,
        cfg.n_layers,
        cfg.dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        ffn=cfg.ffn_dim,
        shared_width=int(sp.backbone["layers"][0]["shared_down"].shape[0]),
        expert_width=int(sp.experts["down"].shape[2]),
        dtype_bytes=sp.experts["gate_up"].dtype.itemsize,
        top_k=sp.rc.moe.top_k,
        other_params=router,
        quant=getattr(sp, "quant", "none"),
    )


def scaled_cost(
    base: ModelCost, name: str, *, layers, dim, ffn, heads, kv_heads, vocab, dtype_bytes=2
) -> ModelCost:
    """The same expert construction (shared and private fractions of the FFN) on other
    dimensions, e.g. `LLAMA2_7B` in bf16 for the paper's scale."""
    frac = ffn / base.ffn
    return dataclasses.replace(
        base,
        name=name,
        layers=layers,
        dim=dim,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=dim // heads,
        vocab=vocab,
        ffn=ffn,
        shared_width=round(base.shared_width * frac),
        expert_width=round(base.expert_width * frac),
        dtype_bytes=dtype_bytes,
        other_params=0,
    )


LLAMA2_7B = dict(layers=32, dim=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


# ----------------------------------------------------------------------------- clock


def compute_s(hw: Hardware, mc: ModelCost, call: dict) -> float:
    return hw.launch_s + max(
        mc.call_flops(call) / (hw.peak_flops * hw.flop_eff),
        mc.call_bytes(call) / (hw.hbm_bw * hw.mem_eff),
    )


class CostClock:
    """Engine clock whose step durations come from the cost model (see module docstring)."""

    def __init__(self, hw: Hardware, mc: ModelCost, pipelined: bool = True):
        self.hw, self.mc, self.pipelined = hw, mc, pipelined
        self.name = f"{hw.name}, {'prefetch' if pipelined else 'on-demand'}"
        self.reset()

    def reset(self) -> None:
        self.link_free = 0.0
        self.load_s = 0.0

    def duration(self, step: dict, wall_s: float, t_start: float) -> float:
        hw, mc, L = self.hw, self.mc, self.mc.layers
        t, link_end = hw.step_s, 0.0
        for w in step["calls"]:
            comp = compute_s(hw, mc, w)
            load = w["loads"] * mc.bytes_per_expert / hw.link_bw
            if load:
                t = max(t, self.link_free - t_start)  # the link may still carry prefetches
                self.load_s += load
            if self.pipelined and load:
                t += load / L + (L - 1) / L * max(load, comp) + comp / L
                link_end = t - comp / L
            else:
                t += load + comp
                link_end = max(link_end, t - comp)
        pf = len(step.get("prefetch", ())) * mc.bytes_per_expert / hw.link_bw
        self.load_s += pf
        self.link_free = max(self.link_free, t_start + link_end) + pf
        return t


# ----------------------------------------------------------------------------- calibration


def step_features(step: dict, mc: ModelCost) -> np.ndarray:
    """[1, calls, bytes read, flops, bytes loaded] of one step record."""
    calls = step["calls"]
    return np.asarray(
        [
            1.0,
            len(calls),
            sum(mc.call_bytes(c) for c in calls),
            sum(mc.call_flops(c) for c in calls),
            sum(c["loads"] for c in calls) * mc.bytes_per_expert,
        ],
        np.float64,
    )


def fit_cpu(steps: list[dict], mc: ModelCost) -> dict:
    """Fit wall_s ~ h + a*calls + bytes/bw + flops/F + loaded/link (all >= 0) to measured
    steps (steps slower than 20x the median, e.g. a stray compile, are left out).

    Returns the constants, R^2, and a `Hardware` profile of this CPU."""
    from scipy.optimize import nnls

    y = np.asarray([s["wall_s"] for s in steps], np.float64)
    keep = y <= 20 * np.median(y)
    steps, y = [s for s, k in zip(steps, keep, strict=True) if k], y[keep]
    X = np.stack([step_features(s, mc) for s in steps])
    scale = np.maximum(X.max(0), 1e-30)
    coef, _ = nnls(X / scale, y)
    coef = coef / scale
    pred = X @ coef
    r2 = 1 - np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30)
    inv = lambda c: float(1 / c) if c > 0 else float("inf")
    fit = {
        "step_s": float(coef[0]),
        "launch_s": float(coef[1]),
        "bandwidth_Bps": inv(coef[2]),
        "flops": inv(coef[3]),
        "link_Bps": inv(coef[4]),
        "r2": float(r2),
        "mean_abs_error_s": float(np.mean(np.abs(y - pred))),
        "steps": len(steps),
    }
    big = 1e30
    fit["hardware"] = Hardware(
        "CPU (fitted)",
        min(fit["bandwidth_Bps"], big),
        min(fit["flops"], big),
        min(fit["link_Bps"], big),
        fit["launch_s"],
        1.0,
        1.0,
        fit["step_s"],
    )
    return fit
