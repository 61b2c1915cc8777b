"""Expert construction from activation statistics (Read-ME section 1.1), and MoE parameters.

Per domain d and layer l, M_d = top `remain_rate` channels by mean |act|. Shared expert =
intersection over domains; expert d = M_d minus shared. Channel index lists are padded with -1
to common widths; padded channels get zero weights, which is exact (silu(0) * 0 = 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model.spec import ExpertSpec

Params = dict[str, Any]


def top_channel_masks(scores_ExLxF: np.ndarray, remain_rate: float) -> np.ndarray:
    """Boolean masks of the top `remain_rate` fraction of channels per (domain, layer)."""
    if not 0.0 < remain_rate <= 1.0:
        raise ValueError(f"remain_rate must be in (0, 1], got {remain_rate}")
    E, L, F = scores_ExLxF.shape
    k = max(1, int(round(remain_rate * F)))
    top = np.argsort(-scores_ExLxF, axis=-1, kind="stable")[..., :k]
    masks = np.zeros((E, L, F), bool)
    np.put_along_axis(masks, top, True, axis=-1)
    return masks


def _pad_indices(lists: list[np.ndarray], width: int) -> np.ndarray:
    out = np.full((len(lists), width), -1, np.int32)
    for i, idx in enumerate(lists):
        out[i, : len(idx)] = idx
    return out


def build_expert_spec(
    scores_ExLxF: np.ndarray, remain_rate: float, domains: list[str]
) -> ExpertSpec:
    masks = top_channel_masks(np.asarray(scores_ExLxF), remain_rate)
    E, L, F = masks.shape
    if len(domains) != E:
        raise ValueError(f"{len(domains)} domain names for {E} statistics rows")
    shared = masks.all(axis=0)  # [L, F]
    private = masks & ~shared[None]
    Fs = int(shared.sum(-1).max())
    Fe = int(private.sum(-1).max())
    shared_idx = _pad_indices([np.flatnonzero(shared[l]) for l in range(L)], Fs)
    expert_idx = np.stack(
        [_pad_indices([np.flatnonzero(private[e, l]) for e in range(E)], Fe) for l in range(L)]
    )
    return ExpertSpec(list(domains), float(remain_rate), masks, shared_idx, expert_idx)


def _layer_weights(layers: Any, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer l's (w_gate_up [D, 2, F], w_down [F, D]) as host arrays, from stacked or per-layer
    params; a stacked host-resident array is viewed, not copied."""
    if not isinstance(layers, dict):
        return np.asarray(layers[l]["w_gate_up"]), np.asarray(layers[l]["w_down"])
    return np.asarray(layers["w_gate_up"])[l], np.asarray(layers["w_down"])[l]


def _put_channels(gu_out, down_out, w_gu_Dx2xF, w_down_FxD, idx) -> None:
    """Write the channels idx (-1 = padding, left zero) into preallocated outputs."""
    real = idx[idx >= 0]
    gu_out[..., : len(real)] = w_gu_Dx2xF[..., real]
    down_out[: len(real)] = w_down_FxD[real]


def build_moe_params(
    dense: Params, spec: ExpertSpec, gates_LxDxE: jax.Array | None = None
) -> Params:
    """Replace each layer's dense FFN by the shared expert plus E zero-padded routed experts.

    dense: stacked ([L, ...] leaves), per-layer (list) or read-per-layer (checkpoints.layers)
    layers. The new arrays are
    shared_gate_up [L, D, 2, Fs], shared_down [L, Fs, D], expert_gate_up [L, E, D, 2, Fe] and
    expert_down [L, E, Fe, D], in the dense dtype, always stacked. Each is allocated once on the
    host, filled layer by layer, then handed to JAX and its host copy dropped before the next is
    built: the extra memory is the MoE FFN plus one of its arrays, never a second stacked copy."""
    layers = dense["layers"]
    first = layers if isinstance(layers, dict) else layers[0]
    dt = first["w_gate_up"].dtype
    L, E = spec.shared_idx_LxFs.shape[0], spec.num_experts
    D = first["w_gate_up"].shape[-3]
    Fs, Fe = spec.shared_idx_LxFs.shape[1], spec.expert_idx_LxExFe.shape[2]
    np_dt = np.asarray(first["w_down"][:0]).dtype
    out = {}
    for gu_key, dn_key, shape_gu, shape_dn in (
        ("shared_gate_up", "shared_down", (L, D, 2, Fs), (L, Fs, D)),
        ("expert_gate_up", "expert_down", (L, E, D, 2, Fe), (L, E, Fe, D)),
    ):
        gu, dn = np.zeros(shape_gu, np_dt), np.zeros(shape_dn, np_dt)
        for l in range(L):
            wgu, wdn = _layer_weights(layers, l)
            if gu_key == "shared_gate_up":
                _put_channels(gu[l], dn[l], wgu, wdn, spec.shared_idx_LxFs[l])
            else:
                for e in range(E):
                    _put_channels(gu[l, e], dn[l, e], wgu, wdn, spec.expert_idx_LxExFe[l, e])
        out[gu_key] = jnp.asarray(gu, dt)
        del gu
        out[dn_key] = jnp.asarray(dn, dt)
        del dn
    keep = [k for k in first if k not in ("w_gate_up", "w_down")]
    if not isinstance(layers, dict):
        new_layers = {k: jnp.stack([lp[k] for lp in layers]) for k in keep}
    else:
        new_layers = {k: layers[k] for k in keep}
    new_layers.update(out)
    if gates_LxDxE is not None:
        new_layers["gate"] = jnp.asarray(gates_LxDxE, dt)
    return {**dense, "layers": new_layers}


def expert_channel_masks(spec: ExpertSpec, F: int) -> tuple[np.ndarray, np.ndarray]:
    """(shared mask [L, F], expert masks [L, E, F]) as float arrays."""
    L = spec.shared_idx_LxFs.shape[0]
    shared = np.zeros((L, F), np.float32)
    experts = np.zeros((L, spec.num_experts, F), np.float32)
    for l in range(L):
        s = spec.shared_idx_LxFs[l]
        shared[l, s[s >= 0]] = 1
        for e in range(spec.num_experts):
            x = spec.expert_idx_LxExFe[l, e]
            experts[l, e, x[x >= 0]] = 1
    return shared, experts


def dense_masked_ffn(shared_mask_F, expert_masks_ExF, routing):
    """Reference FFN: the dense FFN with each token's channel mask (shared + weighted experts)."""
    experts_BxSxK, weights_BxSxK = routing

    def ffn(lp, x_BxSxD, layer):
        gu = jnp.einsum("bsd,dgf->bsgf", x_BxSxD, lp["w_gate_up"])
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        em = jnp.asarray(expert_masks_ExF)[layer][experts_BxSxK]  # [B, S, K, F]
        m = jnp.asarray(shared_mask_F)[layer] + jnp.einsum("bskf,bsk->bsf", em, weights_BxSxK)
        return (h * m.astype(h.dtype)) @ lp["w_down"], None

    return ffn


def static_pruned_params(dense: Params, scores_ExLxF: np.ndarray, remain_rate: float):
    """Baseline: a dense model keeping the top channels of the domain-averaged statistics.
    Returns (params, ffn_width); use with cfg.replace(ffn_dim=ffn_width)."""
    avg = np.asarray(scores_ExLxF).mean(0, keepdims=True)
    mask = top_channel_masks(avg, remain_rate)[0]  # [L, F]
    layers = dense["layers"]
    wgu, wdn = np.asarray(layers["w_gate_up"]), np.asarray(layers["w_down"])
    idx = np.stack([np.flatnonzero(m) for m in mask])  # [L, k]
    gu = np.stack([wgu[l][..., idx[l]] for l in range(len(idx))])
    dn = np.stack([wdn[l][idx[l]] for l in range(len(idx))])
    dt = layers["w_gate_up"].dtype
    new_layers = {**layers, "w_gate_up": jnp.asarray(gu, dt), "w_down": jnp.asarray(dn, dt)}
    return {**dense, "layers": new_layers}, idx.shape[1]


def active_ffn_fraction(spec: ExpertSpec, F: int, top_k: int = 1) -> float:
    """Mean fraction of FFN channels active per token (shared + k average experts)."""
    per_layer = spec.shared_widths + top_k * spec.expert_widths.mean(-1)
    return float(per_layer.mean() / F)


def write_refactor_report(path: Path, spec: ExpertSpec, n_tokens: list[int], F: int) -> dict:
    """path/refactor.json and path/refactor.md: widths per layer and the active FFN fraction."""
    rep = {
        "domains": spec.domains,
        "remain_rate": spec.remain_rate,
        "calibration_tokens": dict(zip(spec.domains, n_tokens, strict=True)),
        "shared_widths": spec.shared_widths.tolist(),
        "expert_widths": spec.expert_widths.tolist(),
        "ffn_dim": F,
        "active_ffn_fraction": active_ffn_fraction(spec, F),
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "refactor.json").write_text(json.dumps(rep, indent=2))
    sw = spec.shared_widths
    lines = [
        f"# Refactor report (remain rate {spec.remain_rate})",
        "",
        f"Domains (one expert each): {', '.join(spec.domains)}; calibration tokens per domain: "
        f"{', '.join(str(n) for n in n_tokens)}.",
        "",
        f"Shared channels per layer: min {sw.min()}, mean {sw.mean():.0f}, max {sw.max()} of {F}. "
        f"Active FFN fraction per token: {rep['active_ffn_fraction']:.3f}.",
        "",
        "| layer | shared | " + " | ".join(spec.domains) + " |",
        "|---|---|" + "---|" * len(spec.domains),
    ]
    for l in range(len(sw)):
        lines.append(
            f"| {l} | {sw[l]} | " + " | ".join(str(w) for w in spec.expert_widths[l]) + " |"
        )
    (path / "refactor.md").write_text("\n".join(lines) + "\n")
    return rep
