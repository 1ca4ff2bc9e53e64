"""Loading diffusers Wan2.1 checkpoints (models.wan.loading) and equivalence with diffusers.

The fixture ``tests/fixtures/wan_tiny`` was made by ``tests/fixtures/make_wan_fixture.py`` with
diffusers' ``WanTransformer3DModel`` (random weights, float32; versions in its metadata.json):
a two-shard diffusers checkpoint plus diffusers' outputs for fixed inputs.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import FIXTURES, modified_checkpoint_copy, rel_l2

from dfsattn_jax.schedule import DFSConfig
from models.common.processor import init_cache, make_backend, num_token_blocks, sparse_step
from models.wan.config import CONFIGS
from models.wan.loading import (
    INDEX_NAME,
    checkpoint_shards,
    diffusers_name,
    expected_tensors,
    load_wan,
    read_wan_config,
)
from models.sampling.loop import Sampler
from models.sampling.unipc import flow_sigmas, flow_timesteps, unipc_init, unipc_step
from models.wan.transformer import WanTransformer3DModel, patchify

FIXTURE = FIXTURES / "wan_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
# float32 end to end; diffusers (torch SDPA) and XLA differ in summation order only: observed
# ~3.4e-7 relative L2; the bound is 1e-5.
RTOL = 1e-5


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    return load_wan(FIXTURE, dtype=jnp.float32)


def _forward(model, io, backend="dense", control=None, cache=None):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, latents, timestep, text, control, cache):
        m = nnx.merge(graphdef, state)
        return m(latents, timestep, text, backend=backend, control=control, cache=cache)

    return run(
        state,
        jnp.asarray(io["latents"]),
        jnp.asarray(io["timestep"]),
        jnp.asarray(io["encoder_hidden_states"]),
        control,
        cache,
    )


# ------------------------------------------------------------------ equivalence with diffusers


def test_fixture_equivalence_dense(model, io):
    out, _ = _forward(model, io)
    assert out.shape == io["output"].shape and out.dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    err = rel_l2(out, io["output"])
    assert err <= RTOL, f"dense: relative L2 to diffusers {err:.2e}"


@pytest.mark.parametrize(
    "dfs",
    [
        # Every layer sparse, 32-token blocks: 144 tokens -> 5 key blocks, the last one partial.
        DFSConfig(density=1.0, block_size=32, tile_size=16, dense_layers=()),
        # The defaults (128-token blocks, layer 0 dense): 2 key blocks, the second one partial.
        DFSConfig(density=1.0),
    ],
    ids=["blocks32_all_sparse", "defaults"],
)
def test_fixture_equivalence_dfs_density_one(model, io, dfs):
    """DFS (Hilbert order, scoring, block-sparse attention) keeping every block equals diffusers."""
    backend = make_backend("dfs", dfs)
    cfg = model.config
    batch, _, f, h, w = io["latents"].shape
    tokens = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    nk = num_token_blocks(tokens, dfs.block_size)
    cache = init_cache(backend, cfg.num_layers, batch, cfg.num_heads, tokens, nk)
    out, cache = _forward(model, io, backend, sparse_step(nk, refresh=True), cache)
    # The sparse path really ran: one refresh per sparse layer, every block kept.
    assert int(cache.refreshes) == len(backend.sparse_layers(cfg.num_layers)) > 0
    np.testing.assert_array_equal(np.asarray(cache.kv_counts), nk)
    err = rel_l2(out, io["output"])
    assert err <= RTOL, f"dfs density 1.0: relative L2 to diffusers {err:.2e}"


def test_embeddings_match_diffusers_intermediates(model, io):
    """Patch embedding and the timestep/text conditioning match diffusers' activations."""
    ref = load_file(FIXTURE / "intermediates.safetensors")
    patches = patchify(jnp.asarray(io["latents"]), model.config.patch_size)
    assert rel_l2(model.patch_embedding(patches), ref["patch_embed"]) <= RTOL
    temb, timestep_proj, text = model.condition_embedder(
        jnp.asarray(io["timestep"]), jnp.asarray(io["encoder_hidden_states"])
    )
    assert rel_l2(temb, ref["temb"]) <= RTOL
    assert rel_l2(timestep_proj.reshape(ref["timestep_proj"].shape), ref["timestep_proj"]) <= RTOL
    assert rel_l2(text, ref["text_embed"]) <= RTOL


def test_sampling_loop_matches_diffusers_pipeline(model):
    """The Wan pipeline's denoising loop (UniPC, classifier-free guidance) in one jitted
    lax.fori_loop gives diffusers' latents after the last step (8 steps, guidance 5, shift 5)."""
    ref = load_file(FIXTURE / "sampling.safetensors")
    sampling = META["sampling"]
    n, guidance, shift = sampling["steps"], sampling["guidance_scale"], sampling["flow_shift"]
    sigmas, timesteps = flow_sigmas(n, shift), flow_timesteps(n, shift)
    np.testing.assert_array_equal(sigmas, ref["sigmas"])
    np.testing.assert_array_equal(timesteps, ref["timesteps"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, noise, text, timesteps):
        m = nnx.merge(graphdef, state)

        def body(i, carry):
            x, solver_state = carry
            t = jnp.broadcast_to(timesteps[i], (2,))
            out, _ = m(jnp.concatenate([x, x]), t, text)  # cond and uncond as one batch of 2
            v = out[1:] + guidance * (out[:1] - out[1:])
            return unipc_step(solver_state, v, x, i)

        return jax.lax.fori_loop(0, n, body, (noise, unipc_init(sigmas, noise)))[0]

    text = jnp.concatenate([jnp.asarray(ref["cond"]), jnp.asarray(ref["uncond"])])
    final = run(state, jnp.asarray(ref["noise"]), text, jnp.asarray(timesteps, jnp.float32))
    chex.assert_tree_all_finite(final)
    # Observed 7e-7 after 8 guided steps (the per-call 3e-7 amplified by guidance 5).
    err = rel_l2(final, ref["latents"][-1])
    assert err <= RTOL, f"sampled latents: relative L2 to diffusers {err:.2e}"
    # The product's own sampler (one jitted program, padded schedule) gives the same latents.
    sampler = Sampler(model, "dense", solver="unipc", shift=shift, progress=False)
    result = sampler(jnp.asarray(ref["noise"]), jnp.asarray(ref["cond"]), jnp.asarray(ref["uncond"]),
                     num_steps=n, guidance_scale=guidance)
    np.testing.assert_array_equal(np.asarray(result.sigmas)[: n + 1], sigmas)
    err = rel_l2(result.latents, ref["latents"][-1])
    assert err <= RTOL, f"Sampler latents: relative L2 to diffusers {err:.2e}"


# ------------------------------------------------------------------ the loader itself


def test_config_from_diffusers_json():
    cfg = read_wan_config(FIXTURE)
    want = META["model_config"]
    assert cfg.dim == want["num_attention_heads"] * want["attention_head_dim"]
    assert (cfg.num_layers, cfg.num_heads, cfg.ffn_dim) == (want["num_layers"], want["num_attention_heads"], want["ffn_dim"])
    assert (cfg.text_dim, cfg.freq_dim, cfg.in_channels, cfg.out_channels) == (
        want["text_dim"], want["freq_dim"], want["in_channels"], want["out_channels"]
    )
    assert cfg.patch_size == tuple(want["patch_size"]) and cfg.eps == want["eps"]
    assert cfg.cross_attn_norm is True


# The transformer config.json of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers.
_REAL_CONFIGS = {
    "wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960),
    "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, num_layers=40, ffn_dim=13824),
}


@pytest.mark.parametrize("name", sorted(_REAL_CONFIGS))
def test_real_configs_and_tensor_names(tmp_path, name):
    """1.3B and 14B configs map onto the built-in configs and the diffusers tensor names/shapes."""
    raw = dict(
        _class_name="WanTransformer3DModel", _diffusers_version="0.33.0.dev0", added_kv_proj_dim=None,
        cross_attn_norm=True, eps=1e-6, freq_dim=256, image_dim=None, in_channels=16, out_channels=16,
        patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096,
        **_REAL_CONFIGS[name],
    )
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(raw))
    cfg = read_wan_config(tmp_path)
    assert cfg == CONFIGS[name]
    # Every block has the same tensors: check the names and full-size shapes on 2 blocks (fast).
    n, dim, ffn = 2, cfg.dim, cfg.ffn_dim
    abstract = nnx.eval_shape(lambda: WanTransformer3DModel(cfg.replace(num_layers=n), rngs=nnx.Rngs(0)))
    specs = expected_tensors(abstract)
    assert len(specs) == 27 * n + 15
    shapes = {k: s.shape for k, s in specs.items()}
    assert shapes["patch_embedding.weight"] == (dim, 16, 1, 2, 2)
    assert shapes["condition_embedder.text_embedder.linear_1.weight"] == (dim, 4096)
    assert shapes["condition_embedder.time_embedder.linear_1.weight"] == (dim, 256)
    assert shapes["condition_embedder.time_proj.weight"] == (6 * dim, dim)
    assert shapes[f"blocks.{n - 1}.ffn.net.0.proj.weight"] == (ffn, dim)
    assert shapes[f"blocks.{n - 1}.ffn.net.2.weight"] == (dim, ffn)
    assert shapes[f"blocks.{n - 1}.attn2.to_out.0.weight"] == (dim, dim)
    assert shapes["blocks.0.attn1.norm_k.weight"] == (dim,)
    assert shapes["blocks.0.scale_shift_table"] == (1, 6, dim)
    assert shapes["scale_shift_table"] == (1, 2, dim)
    assert shapes["proj_out.weight"] == (64, dim)


def test_sharded_checkpoint_two_shards_every_tensor_mapped(model):
    """Both shards are read and every parameter equals its (transposed) stored tensor."""
    shards = checkpoint_shards(FIXTURE)
    assert [p.name for p in shards] == META["shards"]
    stored = {}
    for file in shards:
        part = load_file(file)
        assert part, f"shard {file.name} is empty"
        stored.update(part)
    specs = expected_tensors(model)
    assert set(stored) == set(specs)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = diffusers_name(path)
        want = stored[name]
        if specs[name].axes is not None:
            want = np.transpose(want, specs[name].axes)
        np.testing.assert_array_equal(np.asarray(var.get_value()), want, err_msg=name)


def test_progress_reports_each_shard_once():
    seen = []
    load_wan(FIXTURE / "transformer", dtype=jnp.float32, progress=seen.append)
    assert seen == META["shards"]


def test_bfloat16_load_keeps_float32_modules():
    m = load_wan(FIXTURE, dtype=jnp.bfloat16)
    assert m.blocks[0].attn1.to_q.kernel.get_value().dtype == jnp.bfloat16
    assert m.patch_embedding.kernel.get_value().dtype == jnp.bfloat16
    assert m.condition_embedder.time_embedder.linear_1.kernel.get_value().dtype == jnp.float32
    assert m.blocks[1].scale_shift_table.get_value().dtype == jnp.float32
    assert m.scale_shift_table.get_value().dtype == jnp.float32


def test_single_file_checkpoint(tmp_path, model):
    """An unsharded checkpoint (one diffusion_pytorch_model.safetensors, no index) loads the same."""
    dst = tmp_path / "transformer"
    dst.mkdir()
    shutil.copy(FIXTURE / "transformer" / "config.json", dst / "config.json")
    merged = {}
    for file in checkpoint_shards(FIXTURE):
        merged.update(load_file(file))
    save_file(merged, dst / "diffusion_pytorch_model.safetensors")
    m = load_wan(tmp_path, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ loader errors


def _modified_copy(tmp_path: pathlib.Path, edit) -> pathlib.Path:
    """The fixture checkpoint copied to ``tmp_path/ckpt`` with ``edit(name, array) -> {name:
    array}`` applied to every tensor (shards and index rewritten consistently)."""
    return modified_checkpoint_copy(FIXTURE / "transformer", tmp_path / "ckpt", edit)


def test_error_renamed_tensor(tmp_path):
    old, new = "blocks.1.attn1.to_q.weight", "blocks.1.attn1.to_query.weight"
    path = _modified_copy(tmp_path, lambda k, a: {new if k == old else k: a})
    with pytest.raises(ValueError, match="missing tensors") as err:
        load_wan(path, dtype=jnp.float32)
    assert repr(old) in str(err.value) and "unexpected tensors" in str(err.value) and repr(new) in str(err.value)


def test_error_missing_tensor(tmp_path):
    gone = "condition_embedder.time_proj.bias"
    path = _modified_copy(tmp_path, lambda k, a: {} if k == gone else {k: a})
    with pytest.raises(ValueError, match="missing tensors") as err:
        load_wan(path, dtype=jnp.float32)
    assert repr(gone) in str(err.value) and "unexpected" not in str(err.value)


def test_error_misshaped_tensor(tmp_path):
    bad = "blocks.0.ffn.net.2.weight"  # [dim, ffn] stored as [ffn, dim]
    path = _modified_copy(tmp_path, lambda k, a: {k: np.ascontiguousarray(a.T) if k == bad else a})
    with pytest.raises(ValueError, match="mis-shaped tensors") as err:
        load_wan(path, dtype=jnp.float32)
    msg = str(err.value)
    assert repr(bad) in msg and "[96, 64]" in msg and "expected [64, 96]" in msg


def test_error_index_names_absent_tensor(tmp_path):
    path = _modified_copy(tmp_path, lambda k, a: {k: a})
    index_file = path / "transformer" / INDEX_NAME
    index = json.loads(index_file.read_text())
    index["weight_map"]["blocks.0.attn1.to_k.bias"] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index["weight_map"]["blocks.0.attn1.to_k.bias_extra"] = META["shards"][0]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="listed in .* but are not in it"):
        load_wan(path, dtype=jnp.float32)


def test_error_missing_shard_and_bad_dirs(tmp_path):
    path = _modified_copy(tmp_path, lambda k, a: {k: a})
    (path / "transformer" / META["shards"][1]).unlink()
    with pytest.raises(ValueError, match="shard .* is missing"):
        load_wan(path, dtype=jnp.float32)
    with pytest.raises(ValueError, match="not a diffusers Wan checkpoint"):
        load_wan(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(FIXTURE / "transformer" / "config.json", empty / "config.json")
    with pytest.raises(ValueError, match="has neither"):
        load_wan(empty)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"image_dim": 1280}, "image_dim"),
        ({"added_kv_proj_dim": 5120}, "added_kv_proj_dim"),
        ({"qk_norm": "rms_norm"}, "qk_norm"),
        ({"_class_name": "HunyuanVideoTransformer3DModel"}, "HunyuanVideoTransformer3DModel"),
        ({"num_attention_heads": 0}, "not a valid Wan transformer config"),
    ],
)
def test_error_unsupported_config(tmp_path, change, match):
    raw = json.loads((FIXTURE / "transformer" / "config.json").read_text())
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        read_wan_config(tmp_path)
