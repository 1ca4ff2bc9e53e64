"""Wan2.2-TI2V-5B's transformer: per-token timesteps ``[B, L]`` (diffusers' ``expand_timesteps``),
48 latent channels and the ``wan2.2-ti2v-5b`` config (CPU).

The fixture ``tests/fixtures/wan22_ti2v_tiny`` was made by
``tests/fixtures/make_wan22_ti2v_fixture.py`` with diffusers' ``WanTransformer3DModel``
(random weights, 48 channels in and out, float32; versions in its metadata.json): a two-shard
checkpoint and diffusers' outputs for a ``[B]`` timestep, TI2V image mode's ``[B, L]`` timestep
(0 on the frame-0 tokens, ``t`` elsewhere) and independent random per-token timesteps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from helpers import FIXTURES, ROOT, rel_l2

from dfsattn_jax.schedule import DFSConfig
from models.common.parallel import Parallelism
from models.common.processor import AttentionBackend, init_cache, make_backend, num_token_blocks, sparse_step
from models.wan.config import CONFIGS, get_config, latent_shape, token_grid
from models.wan.loading import expected_tensors, load_wan, read_wan_config
from models.wan.transformer import WanTransformer3DModel, check_timestep_shape, modulation

FIXTURE = FIXTURES / "wan22_ti2v_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
# float32 end to end; diffusers (torch SDPA) and XLA differ in summation order only: observed
# 2.5e-7 to 2.8e-7 relative L2 (the three timestep cases); the bound is 1e-5.
RTOL = 1e-5
# The [B] and [B, L]-with-constant-rows paths embed the same values through matmuls of different
# shapes (B vs B*L rows): observed 1.7e-7 relative L2.
SAME_PATH_TOL = 1e-6
CASES = ("batch", "image", "random")
TOKENS = META["tokens"]  # 72: token grid 3 x 4 x 6


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    return load_wan(FIXTURE, dtype=jnp.float32)


def _forward(model, io, timestep, backend="dense", control=None, cache=None):
    """The jitted model on the fixture's latents and text with ``timestep``."""
    graphdef, state = nnx.split(model)
    backend = make_backend(backend)

    @jax.jit
    def run(state, latents, timestep, text, control, cache):
        return nnx.merge(graphdef, state)(latents, timestep, text, backend=backend, control=control, cache=cache)

    latents, text = jnp.asarray(io["latents"]), jnp.asarray(io["encoder_hidden_states"])
    return run(state, latents, jnp.asarray(timestep), text, control, cache)


# ------------------------------------------------------------------ equivalence with diffusers


def test_fixture_timesteps_are_what_the_pipeline_feeds(io):
    """Image mode: 0 on the 24 frame-0 tokens (raster order), each sample's t on the rest."""
    image = io["timestep_image"]
    assert image.shape == (2, TOKENS) and io["timestep_random"].shape == (2, TOKENS)
    frame0 = TOKENS // 3
    np.testing.assert_array_equal(image[:, :frame0], 0.0)
    rest = np.broadcast_to(io["timestep_batch"][:, None], (2, TOKENS - frame0))
    np.testing.assert_array_equal(image[:, frame0:], rest)
    assert len(np.unique(io["timestep_random"])) == 2 * TOKENS


@pytest.mark.parametrize("case", CASES)
def test_fixture_equivalence_dense(model, io, case):
    out, _ = _forward(model, io, io[f"timestep_{case}"])
    assert out.shape == io[f"output_{case}"].shape == io["latents"].shape and out.dtype == jnp.float32
    err = rel_l2(out, io[f"output_{case}"])
    assert err <= RTOL, f"{case}: relative L2 to diffusers {err:.2e}"


@pytest.mark.parametrize("case", ("image", "random"))
def test_per_token_time_embedding_matches_diffusers(model, io, case):
    temb, timestep_proj, _ = model.condition_embedder(
        jnp.asarray(io[f"timestep_{case}"]), jnp.asarray(io["encoder_hidden_states"])
    )
    assert temb.shape == (2, TOKENS, model.config.dim)
    assert timestep_proj.shape == (2, TOKENS, 6 * model.config.dim)
    assert rel_l2(temb, io[f"temb_{case}"]) <= RTOL


def test_batch_timestep_equals_constant_per_token_rows(model, io):
    t = io["timestep_batch"]
    batch, _ = _forward(model, io, t)
    rows, _ = _forward(model, io, np.repeat(t[:, None], TOKENS, axis=1))
    assert rel_l2(rows, batch) <= SAME_PATH_TOL


@pytest.mark.parametrize("order", ["hilbert3d", "morton3d"])
def test_per_token_timesteps_follow_a_token_order(model, io, order):
    """Dense attention in another token order: the per-token timesteps are permuted with the
    tokens (image mode's frame-0 tokens are not the first ones in Hilbert order)."""
    out, _ = _forward(model, io, io["timestep_image"], make_backend("dense", order=order))
    assert rel_l2(out, io["output_image"]) <= RTOL


@pytest.mark.parametrize(
    "dfs",
    [
        # Every layer sparse, 16-token blocks: 72 tokens -> 5 key blocks, the last one partial.
        DFSConfig(density=1.0, block_size=16, tile_size=4, dense_layers=()),
        # The defaults (128-token blocks, layer 0 dense): one partial block.
        DFSConfig(density=1.0),
    ],
    ids=["blocks16_all_sparse", "defaults"],
)
@pytest.mark.parametrize("case", ("image", "random"))
def test_dfs_density_one_with_per_token_timesteps(model, io, dfs, case):
    """DFS (Hilbert order, scoring, block-sparse attention) keeping every block equals diffusers
    with per-token timesteps."""
    backend = make_backend("dfs", dfs)
    cfg = model.config
    nk = num_token_blocks(TOKENS, dfs.block_size)
    cache = init_cache(backend, cfg.num_layers, 2, cfg.num_heads, TOKENS, nk)
    out, cache = _forward(model, io, io[f"timestep_{case}"], backend, sparse_step(nk, refresh=True), cache)
    assert int(cache.refreshes) == len(backend.sparse_layers(cfg.num_layers)) > 0
    np.testing.assert_array_equal(np.asarray(cache.kv_counts), nk)
    err = rel_l2(out, io[f"output_{case}"])
    assert err <= RTOL, f"dfs density 1.0, {case}: relative L2 to diffusers {err:.2e}"


def test_per_token_timesteps_on_a_device_mesh():
    """Guidance x heads parallel (2 x 2 host devices, in a subprocess: this file as a script),
    dense and DFS at density 1.0: the per-token modulation sharded like the tokens gives
    diffusers' output."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {"dense", "dfs"}
    for backend, err in errors.items():
        assert err <= RTOL, f"{backend} on a 2 x 2 mesh: relative L2 to diffusers {err:.2e}"


def _mesh_worker() -> None:
    """Prints ``{"dense": err, "dfs": err}``: the relative L2 to diffusers of image mode on a
    ``Parallelism(guidance=2, heads=2)`` (needs 4 devices)."""
    io = load_file(FIXTURE / "io.safetensors")
    model = load_wan(FIXTURE, dtype=jnp.float32)
    dfs = DFSConfig(density=1.0, block_size=16, tile_size=4, dense_layers=())
    parallel = Parallelism(guidance=2, heads=2)
    nk = num_token_blocks(TOKENS, dfs.block_size)
    errors = {}
    for name in ("dense", "dfs"):
        backend = AttentionBackend(name, dfs, parallel=parallel)
        cache = init_cache(backend, model.config.num_layers, 2, model.config.num_heads, TOKENS, nk)
        control = sparse_step(nk) if name == "dfs" else None
        out, _ = _forward(model, io, io["timestep_image"], backend, control, cache)
        errors[name] = rel_l2(out, io["output_image"])
    print(json.dumps(errors))


def test_batch_timestep_builds_no_per_token_modulation():
    """A ``[B]`` timestep keeps the Wan2.1 program: no ``[B, L, 6*dim]`` or ``[B, L, 6, dim]``
    modulation is traced (a per-token one is, as the check's own control)."""
    model = WanTransformer3DModel("tiny", rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    dim, grid = model.config.dim, (3, 4, 6)
    x = jnp.zeros((2, 16, 3, 8, 12))
    text = jnp.zeros((2, 5, model.config.text_dim))
    per_token = (f"f32[2,72,{6 * dim}]", f"f32[2,72,6,{dim}]")

    def jaxpr(t):
        return str(jax.make_jaxpr(lambda t: model(x, t, text)[0])(t))

    assert not any(s in jaxpr(jnp.ones((2,))) for s in per_token)
    assert all(s in jaxpr(jnp.ones((2, int(np.prod(grid))))) for s in per_token)


def test_modulation_shapes():
    table = jnp.arange(12.0).reshape(1, 6, 2)
    per_sample = modulation(table, jnp.ones((3, 6, 2)))
    per_token = modulation(table, jnp.ones((3, 5, 6, 2)))
    assert [p.shape for p in per_sample] == [(3, 1, 2)] * 6
    assert [p.shape for p in per_token] == [(3, 5, 2)] * 6
    np.testing.assert_array_equal(per_token[4], jnp.broadcast_to(table[0, 4] + 1.0, (3, 5, 2)))
    np.testing.assert_array_equal(per_sample[4][:, 0], per_token[4][:, 0])


# ------------------------------------------------------------------ timestep shape errors


@pytest.mark.parametrize("shape", [(3,), (1,), (2, TOKENS - 1), (2, TOKENS + 1), (1, TOKENS), (2, TOKENS, 1), (2, 1)])
def test_wrong_timestep_shapes_raise(model, io, shape):
    with pytest.raises(ValueError, match=r"timestep must be a scalar, have shape \(B,\) = \(2,\), or per token "
                                         rf"\(B, L\) = \(2, {TOKENS}\) .* got shape {re.escape(str(shape))}"):
        model(jnp.asarray(io["latents"]), jnp.zeros(shape), jnp.asarray(io["encoder_hidden_states"]))


def test_check_timestep_shape_accepts_the_three_forms():
    for shape in ((), (4,), (4, 10)):
        check_timestep_shape(shape, 4, 10)
    with pytest.raises(ValueError, match=r"\(B, L\) = \(4, 10\)"):
        check_timestep_shape((4, 11), 4, 10)


# ------------------------------------------------------------------ the 5B config and its loader


# The transformer config.json of Wan-AI/Wan2.2-TI2V-5B-Diffusers (scripts/convert_wan_to_diffusers.py).
_REAL_5B = dict(
    _class_name="WanTransformer3DModel", _diffusers_version="0.35.0.dev0", added_kv_proj_dim=None,
    attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=14336, freq_dim=256, image_dim=None,
    in_channels=48, num_attention_heads=24, num_layers=30, out_channels=48, patch_size=[1, 2, 2],
    pos_embed_seq_len=None, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096,
)  # fmt: skip


def test_5b_config_shapes_and_parameter_count():
    cfg = get_config("wan2.2-ti2v-5b")
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.ffn_dim) == (3072, 30, 24, 128, 14336)
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size) == (48, 48, (1, 2, 2))
    assert (cfg.text_dim, cfg.freq_dim) == (4096, 256)
    abstract = nnx.eval_shape(lambda: WanTransformer3DModel(cfg, rngs=nnx.Rngs(0)))  # shapes only, no memory
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert abs(count - 5.0e9) <= 0.01 * 5.0e9, count
    shapes = {k: s.shape for k, s in expected_tensors(abstract).items()}
    assert shapes["patch_embedding.weight"] == (3072, 48, 1, 2, 2)
    assert shapes["proj_out.weight"] == (192, 3072)
    assert shapes["condition_embedder.time_proj.weight"] == (6 * 3072, 3072)
    assert shapes["blocks.29.ffn.net.0.proj.weight"] == (14336, 3072)
    assert len(shapes) == 27 * 30 + 15  # the Wan2.1 names: no new tensor


def test_5b_latent_and_token_grid():
    """The official 121 x 704 x 1280 (Wan2.2 VAE: space / 16) -> latent (48, 31, 44, 80)."""
    shape = latent_shape("wan2.2-ti2v-5b", 121, 704, 1280)
    assert shape == (48, 31, 44, 80)
    assert token_grid("wan2.2-ti2v-5b", shape[1:]) == (31, 22, 40)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 32 \(VAE 16 x patch 2\), got 720"):
        latent_shape("wan2.2-ti2v-5b", 121, 720, 1280)
    with pytest.raises(ValueError, match="24 latent channels"):
        latent_shape(get_config("tiny").replace(name="odd", in_channels=24, out_channels=24), 9, 64, 64)


def test_read_real_5b_config(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(_REAL_5B))
    assert read_wan_config(tmp_path) == CONFIGS["wan2.2-ti2v-5b"]
    # diffusers: ``out_channels = out_channels or in_channels``.
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(_REAL_5B | {"out_channels": None}))
    assert read_wan_config(tmp_path) == CONFIGS["wan2.2-ti2v-5b"]


def test_fixture_config_has_48_channels():
    cfg = read_wan_config(FIXTURE)
    want = META["model_config"]
    assert (cfg.in_channels, cfg.out_channels) == (want["in_channels"], want["out_channels"]) == (48, 48)
    assert (cfg.dim, cfg.num_layers, cfg.ffn_dim) == (32, 2, 64)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"in_channels": 48.5}, "in_channels"),
        ({"out_channels": "48"}, "out_channels"),
        ({"in_channels": 0}, "not a valid Wan transformer config"),
        ({"image_dim": 1280}, "image_dim"),
        ({"pos_embed_seq_len": 514}, "pos_embed_seq_len"),
    ],
)
def test_5b_config_errors(tmp_path, change, match):
    (tmp_path / "config.json").write_text(json.dumps(_REAL_5B | change))
    with pytest.raises(ValueError, match=match):
        read_wan_config(tmp_path)


def test_48_channel_checkpoint_with_a_16_channel_config_is_named(tmp_path):
    """Loading the 48-channel fixture with a config of 16 channels names the mis-shaped tensors
    before any is read."""
    cfg = read_wan_config(FIXTURE).replace(in_channels=16, out_channels=16)
    with pytest.raises(ValueError, match="mis-shaped tensors") as err:
        load_wan(FIXTURE, dtype=jnp.float32, config=cfg)
    assert "'patch_embedding.weight'" in str(err.value) and "'proj_out.weight'" in str(err.value)


if __name__ == "__main__":
    _mesh_worker()
