"""checkpoints/store.py's writer: arrays saved one storage chunk at a time, from the caller's
arrays, into a standard orbax checkpoint."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from memory_probe import peak_rss_during

from readme_jax.checkpoints import models, store
from readme_jax.testing import tiny_readme


def test_chunk_boxes_tile_the_array_once():
    seen = np.zeros((5, 7, 3), int)
    for box in store._chunk_boxes(seen.shape, (2, 7, 2)):
        seen[box] += 1
    assert (seen == 1).all()
    assert list(store._chunk_boxes((), ())) == [()]


def test_arrays_written_in_pieces_load_back_equal(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "WRITE_PIECE", 1000)  # every array in several chunks
    rng = np.random.default_rng(0)
    mapped = np.lib.format.open_memmap(tmp_path / "m.npy", "w+", np.float32, (9, 40))
    mapped[:] = rng.random((9, 40))
    tree = {
        "bf16": rng.random((3, 20, 30)).astype(ml_dtypes.bfloat16),
        "mapped": mapped,
        "jax": jnp.asarray(rng.random((50, 11)), jnp.float32),
        "scalar": np.float32(2.5),
    }
    store.save_model(tmp_path / "x", tree, {"kind": "test"})
    back = store.load_params(tmp_path / "x")
    for k, v in tree.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v), k
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v))
    assert store.verify_files(tmp_path / "x", remember=False)
    m = tiny_readme(num_experts=3, seed=2)
    again = models.load_readme(models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta))
    for (k, x), (_, y) in zip(
        jax.tree.leaves_with_path(m.params), jax.tree.leaves_with_path(again.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(k))


def test_a_save_holds_a_few_pieces_beside_the_arrays(tmp_path, monkeypatch):
    """Saving 134 MB of host arrays in 4 MiB pieces grows the process by well under half of
    that (orbax's own handlers grew it by 1.8x the arrays' bytes: every array copied first)."""
    monkeypatch.setattr(store, "WRITE_PIECE", 4 << 20)
    store.save_model(tmp_path / "warm", {"a": np.ones((4, 4), np.float32)}, {"kind": "test"})
    tree = {f"w{i}": np.random.default_rng(i).random((8, 1024, 2048), np.float32) for i in range(2)}
    _, grown = peak_rss_during(
        lambda: store.save_model(tmp_path / "big", tree, {"kind": "test"}), every_s=0.005
    )
    assert grown < 0.5 * store.tree_nbytes(tree), grown / 1e6


def test_a_load_holds_the_model_once(tmp_path, monkeypatch):
    """Loading 151 MB, most of it one leaf, grows the process by about the arrays' bytes: each
    leaf is read chunk by chunk into an aligned buffer that the CPU device uses in place.
    (orbax's reader returns 16-byte-aligned arrays that every device_put copies: 1.9-2.4x here,
    the model plus its largest leaf, which stopped the 32-layer paper-width model's load on a
    24 GB machine.)"""
    monkeypatch.setattr(store, "WRITE_PIECE", 4 << 20)
    rng = np.random.default_rng(0)
    tree = {"big": rng.random((12, 1024, 2048), np.float32)}
    tree |= {f"w{i}": rng.random((3, 1024, 2048), np.float32) for i in range(2)}
    store.save_model(tmp_path / "big", tree, {"kind": "test"})
    store.load_params(tmp_path / "big")  # warm: orbax's and JAX's own first-use allocations
    back, grown = peak_rss_during(lambda: store.load_params(tmp_path / "big"), every_s=0.002)
    assert grown < 1.3 * store.tree_nbytes(tree), grown / 1e6
    for k, v in tree.items():
        np.testing.assert_array_equal(np.asarray(back[k]), v)


def test_aligned_host_buffers_are_used_in_place_by_the_cpu_device():
    a = store.aligned_empty((3, 1000, 17), ml_dtypes.bfloat16)
    assert a.ctypes.data % store.XLA_ALIGN == 0 and a.shape == (3, 1000, 17)
    a[:] = 1.5
    x = jax.device_put(a)
    assert x.unsafe_buffer_pointer() == a.ctypes.data  # no copy: what the load relies on
    del a
    assert float(jnp.sum(x.astype(jnp.float32))) == 1.5 * 3 * 1000 * 17
