"""The one dispatch (dfsattn_jax.dispatch): which implementation runs, and why, on every device
kind (the GPU is simulated by patching what the dispatch reads of the device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dfsattn_jax import dispatch
from pallas_kernels import block_sparse_mosaic

MOSAIC_HERE = block_sparse_mosaic.unsupported(jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16), 128) is None


def q_of(dtype=jnp.bfloat16, head_dim=128):
    return jax.ShapeDtypeStruct((1, 256, 2, head_dim), dtype)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the default device is a GPU of the given compute capability."""

    def set_capability(capability: str):
        monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
        monkeypatch.setattr(dispatch, "gpu_compute_capability", lambda: capability)

    return set_capability


def test_off_gpu_the_references_run():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU default")
    assert dispatch.resolve("attention", q_of()) == ("xla", "default off GPU")
    assert dispatch.resolve("scoring", q_of()) == ("jnp", "default off GPU")


def test_hopper_runs_mosaic_then_falls_back_with_the_reason(gpu):
    gpu("9.0")
    name, reason = dispatch.resolve("attention", q_of())
    if MOSAIC_HERE:
        assert (name, reason) == ("mosaic_gpu", "default on Hopper GPUs")
    else:  # jax < 0.11.1: the Mosaic GPU kernel API is missing
        assert name == "triton" and "mosaic_gpu does not support this input (jax" in reason
    name, reason = dispatch.resolve("attention", q_of(jnp.float32))
    assert name == "triton" and reason.startswith("mosaic_gpu does not support this input (")
    assert dispatch.resolve("scoring", q_of()) == ("triton", "default on GPUs")


def test_other_gpus_run_triton(gpu):
    gpu("8.0")
    assert dispatch.resolve("attention", q_of()) == ("triton", "default on GPUs")


def test_an_input_no_kernel_takes_falls_back_to_the_reference_naming_both(gpu):
    gpu("9.0")
    name, reason = dispatch.resolve("attention", q_of(head_dim=96))
    assert name == "xla"
    assert "triton does not support this input (head dim 96" in reason
    assert "mosaic_gpu does not support this input" in reason
    name, reason = dispatch.resolve("scoring", q_of(head_dim=96))
    assert name == "jnp" and "triton does not support this input (head dim 96" in reason


def test_a_name_asked_for_runs_anywhere_or_says_why_not():
    assert dispatch.resolve("attention", q_of(jnp.float32), "triton") == ("triton", "asked for")
    assert dispatch.resolve("scoring", q_of(), "jnp") == ("jnp", "asked for")
    with pytest.raises(NotImplementedError, match="attention implementation 'triton' cannot take this input: head dim 96"):
        dispatch.resolve("attention", q_of(head_dim=96), "triton")
    with pytest.raises(NotImplementedError, match="scoring implementation 'triton' cannot take this input"):
        dispatch.resolve("scoring", q_of(), "triton", block_size=48, tile_size=16)


@pytest.mark.parametrize("kind, names", [("attention", ("mosaic_gpu", "triton", "xla")), ("scoring", ("triton", "jnp"))])
def test_unknown_names_and_kinds_are_refused_listing_the_choices(kind, names):
    with pytest.raises(ValueError) as info:
        dispatch.resolve(kind, q_of(), "cuda")
    assert "'cuda'" in str(info.value) and all(repr(n) in str(info.value) for n in names)
    with pytest.raises(ValueError, match="scoring_implementation must be one of"):
        dispatch.check_implementation(kind, "cuda", "scoring_implementation")
    assert dispatch.check_implementation(kind, None) is None
    assert tuple(dispatch.KINDS[kind]) == names  # the default's order
    with pytest.raises(ValueError, match="kind must be one of"):
        dispatch.resolve("dense", q_of())


def test_each_record_runs_a_function_and_says_if_it_is_a_pallas_kernel():
    for kind, table in dispatch.KINDS.items():
        for name, impl in table.items():
            assert impl.name == name and callable(impl.run) and impl.description
            assert impl.pallas == (name not in ("xla", "jnp")), (kind, name)
            assert impl.run.__module__.split(".")[0] in ("pallas_kernels", "dfsattn_jax")
