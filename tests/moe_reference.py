"""The reference MoE dispatch the tests compare every real mode against."""

import jax
import jax.numpy as jnp


def masked_experts(x_TxD, experts_TxA, weights_TxA, gu_ExDx2xF, down_ExFxD):
    """Every expert on every token, weighted by the (one-hot) routing: the simple reference."""
    E = gu_ExDx2xF.shape[0]
    w_TxE = jnp.sum(jax.nn.one_hot(experts_TxA, E) * weights_TxA[..., None], axis=1)
    gu = jnp.einsum("td,edgf->tegf", x_TxD, gu_ExDx2xF)
    h_TxExF = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    return jnp.einsum("tef,efd,te->td", h_TxExF, down_ExFxD, w_TxE.astype(h_TxExF.dtype))
