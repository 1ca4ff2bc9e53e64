"""The Flax NNX HunyuanVideo transformer (models.hunyuan_video) against diffusers 0.42.1.

The fixture ``tests/fixtures/hunyuan_tiny`` was made by ``tests/fixtures/make_hunyuan_fixture.py``
with diffusers' ``HunyuanVideoTransformer3DModel`` (random weights, float32): 2 dual-stream,
2 single-stream and 2 refiner blocks; batch 2 with 38 and 9 valid of 64 text tokens (padded
embeddings random too) and guidance 6000 / 3500; 300 video tokens.
"""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from helpers import FIXTURES, rel_l2

from dfsattn_jax.joint import JointTokens
from dfsattn_jax.schedule import DFSConfig
from models.common.processor import AttentionState, init_cache, make_backend, num_token_blocks, sparse_step
from models.hunyuan_video.config import CONFIGS, HunyuanConfig, get_config, latent_shape, token_grid
from models.hunyuan_video.loading import load_hunyuan_video
from models.hunyuan_video.transformer import HunyuanConditioning, HunyuanVideoTransformer3DModel

FIXTURE = FIXTURES / "hunyuan_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
# float32 end to end. diffusers (torch SDPA, torch's float32 exp) and XLA differ in summation
# order and in 3 of the 128 sinusoid frequencies, which torch's float32 exp rounds the other way
# (one ulp; at guidance 6000 that is 2e-4 rad): observed 7.4e-6 relative L2 on the output and
# <= 7e-6 on every intermediate; the bound is 1e-5.
RTOL = 1e-5
# Same model, same float32 inputs, another token order or attention path (summation order
# only): observed <= 2.5e-7.
ORDER_RTOL = 1e-6


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def model() -> HunyuanVideoTransformer3DModel:
    return load_hunyuan_video(FIXTURE, dtype=jnp.float32)


def _cond(io, prompt_embeds=None) -> HunyuanConditioning:
    """The fixture's conditioning with the guidance *scale* (diffusers' guidance / 1000, exact
    for 6000 and 3500)."""
    return HunyuanConditioning(
        jnp.asarray(io["encoder_hidden_states"] if prompt_embeds is None else prompt_embeds),
        jnp.asarray(io["encoder_attention_mask"]),
        jnp.asarray(io["pooled_projections"]),
        jnp.asarray((io["guidance"].astype(np.float64) / 1000.0).astype(np.float32)),
    )


def _jit_forward(model):
    """``run(io, cond, backend, control, cache) -> (prediction, state)``: ``model.forward`` jitted
    once per backend."""
    graphdef, params = nnx.split(model)
    compiled = {}

    def run(io, cond, backend="dense", control=None, cache=None):
        backend = make_backend(backend)
        if backend not in compiled:

            def forward(params, latents, timestep, cond, control, cache):
                m = nnx.merge(graphdef, params)
                return m.forward(
                    latents, timestep, cond, backend=backend, state=AttentionState(control=control, cache=cache)
                )

            compiled[backend] = jax.jit(forward)
        return compiled[backend](
            params, jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond, control, cache
        )

    return run


@pytest.fixture(scope="module")
def run(model):
    return _jit_forward(model)


# ------------------------------------------------------------------ equivalence with diffusers


def test_fixture_equivalence_dense_diffusers_call(model, io):
    """``model(...)`` with diffusers' forward arguments (guidance in diffusers' units) equals diffusers."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, *args):
        return nnx.merge(graphdef, params)(*args)

    names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
             "guidance")
    out, cache = run(params, *(jnp.asarray(io[k]) for k in names))
    assert cache is None
    assert out.shape == io["output"].shape and out.dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    err = rel_l2(out, io["output"])
    assert err <= RTOL, f"dense: relative L2 to diffusers {err:.2e}"


def test_fixture_equivalence_dense_forward(model, run, io):
    """``model.forward`` with a :class:`HunyuanConditioning` (guidance scale, x1000 inside) equals diffusers."""
    out, state = run(io, _cond(io))
    chex.assert_tree_all_finite(out)
    assert state.cache is None
    err = rel_l2(out, io["output"])
    assert err <= RTOL, f"dense forward: relative L2 to diffusers {err:.2e}"


def test_intermediates_match_diffusers(model, io):
    """temb, the refiner's conditioning, the refined text, the patch embedding and every
    block's video and (valid) text outputs match diffusers' activations, block by block."""
    ref = load_file(FIXTURE / "intermediates.safetensors")
    graphdef, params = nnx.split(model)
    valid = io["encoder_attention_mask"].astype(bool)  # padded text rows are not meaningful
    pooled_text = (io["encoder_hidden_states"] * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)

    @jax.jit
    def activations(params, latents, timestep, cond, guidance, pooled_text):
        m = nnx.merge(graphdef, params)
        prep = m.prepare(latents, timestep, cond, embedded_guidance=guidance)
        acts = dict(temb=prep.temb, context=prep.text, patch_embed=prep.video)
        acts["context_temb"] = m.context_embedder.time_text_embed(timestep, pooled_text)
        backend, state = make_backend("dense"), AttentionState()
        video, text = prep.video, prep.text
        for i, block in enumerate(m.transformer_blocks):
            video, text, state = block(video, text, prep.temb, prep.rope, attend=m._attend(i, prep, backend), state=state)
            acts[f"dual_{i}_video"], acts[f"dual_{i}_text"] = video, text
        x = jnp.concatenate([video, text], axis=1)
        first, video_len = m.config.num_dual_layers, prep.joint.video_len
        for i, block in enumerate(m.single_transformer_blocks):
            x, state = block(x, prep.temb, prep.rope, attend=m._attend(first + i, prep, backend), state=state)
            acts[f"single_{i}_video"], acts[f"single_{i}_text"] = x[:, :video_len], x[:, video_len:]
        acts["norm_out"] = m.output_norm(x[:, :video_len], prep.temb)
        return acts

    acts = activations(
        params, jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), _cond(io),
        jnp.asarray(io["guidance"]), jnp.asarray(pooled_text, jnp.float32),
    )  # fmt: skip
    assert set(acts) == set(ref)
    for name, value in acts.items():
        value, want = np.asarray(value), ref[name]
        if name == "context" or name.endswith("_text"):
            value, want = value[valid], want[valid]
        err = rel_l2(value, want)
        assert err <= RTOL, f"{name}: relative L2 to diffusers {err:.2e}"


# ------------------------------------------------------------------ joint attention and DFS


def test_padded_text_is_ignored(model, run, io):
    """Other (finite) values at the padded text positions change no output bit, dense and DFS."""
    mask = io["encoder_attention_mask"].astype(bool)
    text = io["encoder_hidden_states"]
    other = np.where(mask[..., None], text, 3.0 - 2.0 * text).astype(np.float32)
    assert np.abs(other - text)[~mask].min() > 0 and np.array_equal(other[mask], text[mask])
    base, _ = run(io, _cond(io))
    moved, _ = run(io, _cond(io, other))
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(base))

    backend = make_backend("dfs", DFSConfig(block_size=32, tile_size=8, dense_layers=()))
    outs = []
    for prompt in (text, other):
        cond = _cond(io, prompt)
        grid = model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond)
        tokens = model.attention_length(grid, cond)
        cache = init_cache(backend, model.config.num_layers, 2, model.config.num_heads, tokens, 4)
        out, state = run(io, cond, backend, sparse_step(4), cache)
        outs.append((np.asarray(out), np.asarray(state.cache.kv_indices), np.asarray(state.cache.kv_counts)))
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(got, want)


def test_hilbert_order_equals_raster(model, run, io):
    """Running the video tokens in hilbert3d order (RoPE gathered, text last) changes nothing
    but the summation order."""
    raster, _ = run(io, _cond(io), make_backend("dense"))
    hilbert, _ = run(io, _cond(io), make_backend("dense", order="hilbert3d"))
    err = rel_l2(hilbert, raster)
    assert 0 < err <= ORDER_RTOL, f"hilbert3d vs raster {err:.2e}"


@pytest.mark.parametrize(
    "dfs, implementation, interpret",
    [
        # 32-token blocks: 364 joint tokens -> 12 key blocks, 9 of video; block 9 mixes video and
        # text, block 10 is partly valid for sample 0 and all padding for sample 1, block 11 is
        # all padding. The XLA path (the reference, with key lengths).
        (DFSConfig(block_size=32, tile_size=8, dense_layers=()), None, False),
        # 128-token blocks through the Pallas Triton kernel in its interpreter: 3 key blocks, the
        # last one mixes video and text.
        (DFSConfig(block_size=128, tile_size=16, dense_layers=()), "triton", True),
    ],
    ids=["blocks32_xla", "blocks128_triton_interpret"],
)
def test_dfs_density_one_equals_dense(model, run, io, dfs, implementation, interpret):
    """The dfs backend (hilbert3d, scoring, joint block selection, block-sparse attention with
    key lengths) keeping every block equals diffusers and the dense model in the same order."""
    backend = make_backend("dfs", dfs, sparse_implementation=implementation, interpret=interpret)
    cond = _cond(io)
    grid = model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond)
    tokens = model.attention_length(grid, cond)
    nk = num_token_blocks(tokens, dfs.block_size)
    cfg = model.config
    cache = init_cache(backend, cfg.num_layers, 2, cfg.num_heads, tokens, nk)
    out, state = run(io, cond, backend, sparse_step(nk), cache)
    # The sparse path ran in every joint attention: one refresh per layer.
    assert int(state.cache.refreshes) == cfg.num_layers
    assert rel_l2(out, io["output"]) <= RTOL
    dense, _ = run(io, cond, make_backend("dense", order=dfs.order))
    err = rel_l2(out, dense)
    assert err <= ORDER_RTOL, f"dfs at density 1.0 vs dense {err:.2e}"


def test_partial_forward_threads_state(model, io):
    """``num_layers`` stops after that many joint attentions (dual first) and returns the state."""
    backend = make_backend("dfs", DFSConfig(block_size=32, tile_size=8, dense_layers=()))
    cond = _cond(io)
    grid = model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond)
    tokens = model.attention_length(grid, cond)
    cache = init_cache(backend, model.config.num_layers, 2, model.config.num_heads, tokens, 5)
    graphdef, params = nnx.split(model)

    @jax.jit
    def partial(params, latents, timestep, cond, cache):
        state = AttentionState(control=sparse_step(5), cache=cache)
        return nnx.merge(graphdef, params).forward(latents, timestep, cond, backend=backend, state=state, num_layers=3)

    out, state = partial(params, jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond, cache)
    assert out is None
    assert int(state.cache.refreshes) == 3
    counts = np.asarray(state.cache.kv_counts)
    # The three layers that ran wrote their slots (text rows are dense: count 0); the last slot
    # is still the initial cache's.
    assert (counts[:3, ..., 300 // 32 + 1 :] == 0).all() and (counts[:3, ..., : 300 // 32] > 0).all()
    np.testing.assert_array_equal(counts[3:], np.asarray(cache.kv_counts)[3:])
    np.testing.assert_array_equal(np.asarray(state.cache.kv_indices)[3:], np.asarray(cache.kv_indices)[3:])
    with pytest.raises(ValueError, match="num_layers"):
        model.forward(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond, num_layers=5)


# ------------------------------------------------------------------ inputs, config, dtypes


def test_joint_tokens_and_attention_length(model, io):
    grid = model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), _cond(io))
    assert grid == (5, 5, 12)
    assert model.joint_tokens(grid, _cond(io)) == JointTokens(video_len=300, text_len=64)
    assert model.attention_length(grid, _cond(io)) == 364
    graphdef, params = nnx.split(model)

    @jax.jit
    def lengths_and_rope(params, latents, timestep, cond):
        prep = nnx.merge(graphdef, params).prepare(latents, timestep, cond, backend=make_backend("dense", order="hilbert3d"))
        return prep.kv_lengths, prep.rope

    kv_lengths, (cos, sin) = lengths_and_rope(params, jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), _cond(io))
    np.testing.assert_array_equal(np.asarray(kv_lengths), 300 + np.asarray(META["valid_text"]))
    # RoPE leaves the text rows alone (cos 1, sin 0); the video rows are rotations.
    assert cos.shape == sin.shape == (364, 8)
    np.testing.assert_array_equal(np.asarray(cos[300:]), 1.0)
    np.testing.assert_array_equal(np.asarray(sin[300:]), 0.0)
    np.testing.assert_allclose(np.asarray(cos[:300]) ** 2 + np.asarray(sin[:300]) ** 2, 1.0, rtol=1e-6)
    assert np.abs(np.asarray(sin[:300])).max() > 0.5


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(prompt_attention_mask=np.array([[0] * 26 + [1] * 38, [1] * 9 + [0] * 55])), "right-padded"),
        (dict(prompt_attention_mask=np.array([[1] * 38 + [0] * 26, [0] * 64])), "at least one valid token"),
        (dict(prompt_attention_mask=np.array([[2] * 38 + [0] * 26, [1] * 9 + [0] * 55])), "0/1"),
        (dict(prompt_attention_mask=np.ones((2, 64), np.float32)), "int or bool"),
        (dict(prompt_attention_mask=np.ones((2, 63), np.int32)), r"prompt_attention_mask must have shape \(2, 64\)"),
        (dict(prompt_embeds=np.ones((2, 64, 41), np.float32)), r"prompt_embeds must have shape \[2, T, 40\]"),
        (dict(pooled_prompt_embeds=np.ones((2, 23), np.float32)), r"pooled_prompt_embeds must have shape \(2, 24\)"),
        (dict(guidance=None), "cond.guidance is required"),
        (dict(guidance=np.ones((3,), np.float32)), r"cond.guidance must be a scalar or have shape \(2,\)"),
    ],
)
def test_check_inputs_names_the_argument(model, io, change, match):
    cond = _cond(io)._replace(**{k: (None if v is None else jnp.asarray(v)) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), cond)


def test_check_inputs_latents(model, io):
    cond = _cond(io)
    with pytest.raises(ValueError, match="16 channels"):
        model.check_inputs(jnp.ones((2, 8, 5, 10, 24)), jnp.asarray(io["timestep"]), cond)
    with pytest.raises(ValueError, match="does not fit the patch"):
        model.check_inputs(jnp.ones((2, 16, 5, 11, 24)), jnp.asarray(io["timestep"]), cond)
    with pytest.raises(ValueError, match="timestep"):
        model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.ones((3,)), cond)
    with pytest.raises(ValueError, match="HunyuanConditioning"):
        model.check_inputs(jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), tuple(cond))


def test_configs_and_shapes():
    big = get_config("hunyuan-video-13b")
    assert (big.dim, big.num_layers, big.num_heads, big.head_dim, big.mlp_dim) == (3072, 60, 24, 128, 12288)
    assert latent_shape(big, 129, 720, 1280) == (16, 33, 90, 160)
    assert token_grid(big, (33, 90, 160)) == (33, 45, 80)
    assert token_grid("hunyuan-video-13b", latent_shape(big, 129, 544, 960)[1:]) == (33, 34, 60)
    assert get_config("tiny").num_layers == 4 and sorted(CONFIGS) == ["hunyuan-video-13b", "tiny"]
    with pytest.raises(ValueError, match="config must be one of"):
        get_config("wan2.1-1.3b")
    with pytest.raises(ValueError, match="axis_dims"):
        HunyuanConfig(name="x", num_heads=2, head_dim=16, num_dual_layers=1, num_single_layers=1, rope_axes_dim=(4, 6, 4))
    with pytest.raises(ValueError, match="num_dual_layers"):
        HunyuanConfig(name="x", num_heads=2, head_dim=16, num_dual_layers=-1, num_single_layers=1, rope_axes_dim=(4, 6, 6))
    with pytest.raises(ValueError, match="frames must be 4"):
        latent_shape(big, 128, 720, 1280)


def test_13b_tensor_names_match_diffusers():
    """At the 13B width (24 x 128 heads, text 4096, pooled 768, 2 blocks of each kind, so that
    it builds in a second) the diffusers tensor names and shapes (abstract model, no memory)
    hash to what diffusers' ``HunyuanVideoTransformer3DModel(num_layers=2,
    num_single_layers=2)`` has; the 13B config then only repeats the blocks (20 + 40)."""
    import hashlib
    import math

    from models.common.checkpoint import expected_tensors

    config = get_config("hunyuan-video-13b").replace(num_dual_layers=2, num_single_layers=2)
    abstract = nnx.eval_shape(
        lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    specs = expected_tensors(abstract)
    lines = sorted(f"{name}:{list(spec.shape)}" for name, spec in specs.items())
    want = META["width_13b_depth_2"]
    assert len(lines) == want["num_tensors"]
    assert sum(math.prod(s.shape) for s in specs.values()) == want["num_parameters"]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == want["names_shapes_sha256"]
    assert {spec.dtype for spec in specs.values()} == {jnp.dtype(jnp.bfloat16)}
    # The full 13B model (diffusers' defaults): 1,264 tensors, 12.8 B parameters.
    per_dual = sum(1 for n in lines if n.startswith("transformer_blocks.0."))
    per_single = sum(1 for n in lines if n.startswith("single_transformer_blocks.0."))
    big = get_config("hunyuan-video-13b")
    full = len(lines) + (big.num_dual_layers - 2) * per_dual + (big.num_single_layers - 2) * per_single
    assert full == META["default_config_13b"]["num_tensors"] == 1264


def test_bfloat16_model_close_to_float32(model, io):
    """bf16 parameters and activations (the GPU default) stay within bf16 error of float32."""
    bf16 = load_hunyuan_video(FIXTURE, dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    out, _ = _jit_forward(bf16)(io, _cond(io))
    assert out.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(out)
    # 8-bit mantissa through 4 blocks of random weights: observed 1.7e-2.
    err = rel_l2(np.asarray(out, np.float32), io["output"])
    assert err <= 5e-2, f"bf16 vs diffusers float32 {err:.2e}"
