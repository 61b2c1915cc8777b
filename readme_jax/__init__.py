"""readme_jax: Read-ME (router-decoupled, pre-gated Mixture of Experts) in JAX/Flax.

Quick start:
    import readme_jax as rj
    m = rj.load()                                    # bundled SmolLM2-135M-Instruct (GGUF)
    ids = m.tokenizer.encode("It is a truth universally acknowledged")
    logits = m.logits([ids])                         # [1, S, V]
    print(m.generate("What is the capital of France?", chat=True, max_new_tokens=20))
"""

from readme_jax.api import LoadedModel, load

__all__ = ["LoadedModel", "load"]
__version__ = "0.1.0"
