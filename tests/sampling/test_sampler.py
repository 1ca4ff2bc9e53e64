"""Tests of the jitted flow-matching sampler (CPU, tiny config).

References are plain Python loops over jitted single-step model calls, written out here: Euler
``x += (sigma[i+1] - sigma[i]) * v`` with ``v = v_uncond + g (v_cond - v_uncond)`` from two
batch-1 evaluations with their own mask caches.
"""

from __future__ import annotations

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfsattn_jax.cache import cache_layout
from dfsattn_jax.schedule import DFSConfig, plan_schedule, reported_sparsity
from models.common.processor import AttentionBackend, StepControl, init_cache, make_backend, num_token_blocks
from models.wan.config import get_config
from models.sampling import SCHEDULE_NAMES, Sampler, Solver, flow_schedule, get_solver, step_capacity
from models.sampling.solvers import EULER
from models.wan.transformer import WanTransformer3DModel

CFG = get_config("tiny")
LATENT = (16, 3, 16, 16)  # token grid 3 x 8 x 8 = 192 tokens
L = 192
# 12 blocks of 16 tokens; dense steps 0-1, refreshes at 2, 4, 6 (densities 0.5, 0.3, 0.1).
DFS = DFSConfig(density=0.5, density_decrement=0.2, dense_steps=2, refresh_interval=2,
                tile_size=4, block_size=16, dense_layers=(0,))
NK = num_token_blocks(L, DFS.block_size)
SPARSE_LAYERS = 1  # tiny has 2 layers, layer 0 dense
TEXT_LEN = 5
# float32 loops that differ only in batching / loop structure: observed ~1e-7 relative.
F32_TOL = 1e-5


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    m = WanTransformer3DModel("tiny", rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(1)
    state = nnx.state(m, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    leaves = [jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32)) for x in leaves]
    nnx.update(m, jax.tree.unflatten(treedef, leaves))
    return m


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((1, *LATENT), np.float32))
    text = jnp.asarray(rng.standard_normal((1, TEXT_LEN, CFG.text_dim), np.float32))
    neg = jnp.asarray(rng.standard_normal((1, TEXT_LEN, CFG.text_dim), np.float32))
    return noise, text, neg


@pytest.fixture(scope="module")
def dfs_sampler(model):
    return Sampler(model, AttentionBackend("dfs", DFS), progress=False)


@pytest.fixture(scope="module")
def dfs_runs(dfs_sampler, inputs):
    """4 and 8 steps, then 8 steps at other densities and another guidance scale."""
    noise, text, neg = inputs
    r4 = dfs_sampler(noise, text, neg, num_steps=4, guidance_scale=5.0)
    r8 = dfs_sampler(noise, text, neg, num_steps=8, guidance_scale=4.0)
    other = DFSConfig(density=0.4, density_decrement=0.1, dense_steps=3, refresh_interval=3,
                      tile_size=4, block_size=16, dense_layers=(0,))
    r8b = dfs_sampler(noise, text, neg, num_steps=8, guidance_scale=3.0, dfs=other)
    return r4, r8, r8b, other


def _single_step_fn(model, backend):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(x, t, text, control, cache):
        return nnx.merge(graphdef, state)(x, t, text, backend=backend, control=control, cache=cache)

    return step


def test_flow_schedule_matches_wan_unipc_rule():
    for n, shift in ((50, 5.0), (7, 3.0), (1, 1.0)):
        sigmas, timesteps = flow_schedule(n, shift)
        chex.assert_shape(sigmas, (n + 1,))
        chex.assert_shape(timesteps, (n,))
        base = np.linspace(1.0, 1.0 / 1000, n + 1)[:-1]  # diffusers' flow sigmas before the shift
        expect = shift * base / (1.0 + (shift - 1.0) * base)
        if expect[0] == 1.0:
            expect[0] -= 1e-6  # diffusers nudges a first sigma of exactly 1
        np.testing.assert_allclose(sigmas[:-1], expect.astype(np.float32), rtol=0, atol=0)
        assert sigmas[-1] == 0.0 and sigmas.dtype == np.float32
        np.testing.assert_array_equal(timesteps, np.floor(expect * 1000).astype(np.int64))
        assert np.all(np.diff(sigmas) < 0)
    assert step_capacity(4) == step_capacity(8) == step_capacity(50) == 64
    assert step_capacity(100) == 128


def test_compiles_once_for_steps_densities_and_guidance(dfs_sampler, dfs_runs):
    r4, r8, r8b, other = dfs_runs
    assert dfs_sampler.trace_count == 1
    assert r4.latents.shape == r8.latents.shape == (1, *LATENT)
    assert r8b.plan.refresh_steps == plan_schedule(other, 8, NK).refresh_steps != r8.plan.refresh_steps
    assert np.all(np.isfinite(np.asarray(r8.latents)))


def test_refreshes_happen_exactly_at_planned_steps(dfs_runs):
    r4, r8, r8b, _ = dfs_runs
    for result in (r4, r8, r8b):
        plan = result.plan
        np.testing.assert_array_equal(result.refreshed, SPARSE_LAYERS * plan.refresh.astype(np.int32))
        assert result.refresh_steps == plan.refresh_steps
        assert int(result.cache.refreshes) == SPARSE_LAYERS * len(plan.refresh_steps)
    assert r8.refresh_steps == (2, 4, 6)
    assert r4.refresh_steps == (2,)


def test_reported_sparsity_matches_plan(dfs_runs):
    _, r8, r8b, other = dfs_runs
    for result, dfs in ((r8, DFS), (r8b, other)):
        plan = result.plan
        expect = np.where(plan.sparse, (1.0 - plan.num_blocks / NK) * SPARSE_LAYERS / CFG.num_layers, 0.0)
        np.testing.assert_allclose(result.skipped, expect, rtol=1e-6)
        np.testing.assert_allclose(result.sparsity, reported_sparsity(plan, CFG.num_layers, dfs.dense_layers),
                                   rtol=1e-6)
        assert result.sparsity > 0.1


def test_guidance_batch_of_two_equals_two_batch_one_runs(model, inputs, dfs_runs):
    """CFG as one batch of 2 (own layouts per element) == cond and uncond run separately."""
    noise, text, neg = inputs
    _, r8, _, _ = dfs_runs
    backend = AttentionBackend("dfs", DFS)
    step = _single_step_fn(model, backend)
    sigmas, timesteps = flow_schedule(8)
    plan = r8.plan
    kmax = r8.cache.max_blocks
    cond_cache = init_cache(backend, CFG.num_layers, 1, CFG.num_heads, L, kmax)
    unc_cache = init_cache(backend, CFG.num_layers, 1, CFG.num_heads, L, kmax)
    x = noise
    for i in range(8):
        control = StepControl(jnp.asarray(plan.sparse[i]), jnp.asarray(plan.refresh[i]),
                              jnp.asarray(plan.num_blocks[i], jnp.int32))
        t = jnp.full((1,), float(timesteps[i]), jnp.float32)
        v_cond, cond_cache = step(x, t, text, control, cond_cache)
        v_unc, unc_cache = step(x, t, neg, control, unc_cache)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_unc + 4.0 * (v_cond - v_unc))
    assert _rel(r8.latents, x) < F32_TOL
    # Each element of the guided batch kept its own layouts.
    joint = cache_layout(r8.cache, 0, NK).to_dense_mask()
    np.testing.assert_array_equal(np.asarray(joint[:1]), np.asarray(cache_layout(cond_cache, 0, NK).to_dense_mask()))
    np.testing.assert_array_equal(np.asarray(joint[1:]), np.asarray(cache_layout(unc_cache, 0, NK).to_dense_mask()))
    assert not np.array_equal(np.asarray(joint[0]), np.asarray(joint[1]))


def test_dense_sampler_is_euler_without_guidance_and_shows_progress(model, inputs, capsys):
    noise, text, _ = inputs
    sampler = Sampler(model, "dense", progress=True)
    result = sampler(noise, text, num_steps=5)
    err = capsys.readouterr().err
    assert "sampling (dense)" in err and "5/5" in err
    assert result.plan is None and result.cache is None and result.sparsity == 0.0
    step = _single_step_fn(model, make_backend("dense"))
    sigmas, timesteps = flow_schedule(5)
    x = noise
    for i in range(5):
        v, _ = step(x, jnp.full((1,), float(timesteps[i])), text, None, None)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    assert _rel(result.latents, x) < F32_TOL


def test_without_a_cpu_device_sampling_runs_with_no_bar(model, inputs, monkeypatch, capsys):
    # JAX_PLATFORMS=cuda leaves JAX no CPU device for host callbacks: the bar and the step clock
    # are dropped with a warning instead of failing inside the compiled loop.
    from models.sampling import loop

    noise, text, _ = inputs
    monkeypatch.setattr(loop, "host_callbacks_available", lambda: False)
    with pytest.warns(UserWarning, match="JAX_PLATFORMS"):
        sampler = Sampler(model, "dense", progress=True)
    assert not sampler.progress
    result = sampler(noise, text, num_steps=2)
    assert "sampling (dense)" not in capsys.readouterr().err
    want = Sampler(model, "dense", progress=False)(noise, text, num_steps=2)
    np.testing.assert_array_equal(np.asarray(result.latents), np.asarray(want.latents))


def test_solver_is_a_pair_of_pure_functions(model, inputs):
    noise, text, _ = inputs
    assert get_solver("euler") is EULER
    # A solver that ignores the model and writes step_index + its own step counter.
    probe = Solver(
        "probe",
        init=lambda schedule, x: jnp.zeros((), jnp.float32),
        step=lambda state, v, x, i: (jnp.zeros_like(x) + i + 10.0 * (state + 1.0), state + 1.0),
    )
    result = Sampler(model, "dense", solver=probe, progress=False)(noise, text, num_steps=3)
    np.testing.assert_array_equal(np.asarray(result.latents), np.full((1, *LATENT), 2 + 30.0, np.float32))


def test_non_finite_final_latents_warn(model, inputs):
    noise, text, _ = inputs
    # A solver that returns the model-free latents with one NaN written at the last step.
    def step(state, v, x, i):
        return jnp.where(i == 2, x.at[0, 0, 0, 0, 0].set(jnp.nan), x), state

    sampler = Sampler(model, "dense", solver=Solver("nan", init=lambda s, x: jnp.zeros(()), step=step), progress=False)
    with pytest.warns(RuntimeWarning, match=r"1 non-finite values among the .* final latents"):
        result = sampler(noise, text, num_steps=3)
    assert np.isnan(np.asarray(result.latents)).sum() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        finite = Sampler(model, "dense", progress=False)(noise, text, num_steps=2)
    assert np.isfinite(np.asarray(finite.latents)).all()


def test_bad_sampler_inputs_raise(model, inputs, dfs_sampler):
    noise, text, neg = inputs
    with pytest.raises(ValueError, match="solver"):
        get_solver("heun")
    with pytest.raises(ValueError, match="num_steps"):
        dfs_sampler(noise, text, neg, num_steps=0)
    with pytest.raises(ValueError, match="negative_text"):
        dfs_sampler(noise, text, neg[:, :2], num_steps=2)
    with pytest.raises(ValueError, match="block_size"):
        dfs_sampler(noise, text, neg, num_steps=2, dfs=DFSConfig(block_size=32, tile_size=4))
    with pytest.raises(ValueError, match="hidden_states"):
        dfs_sampler(noise[:, :, :, :15], text, neg, num_steps=2)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        dfs_sampler(noise, text[..., :-1], num_steps=2)


@pytest.mark.parametrize("shift", [True, 0.0, -1.0, math.inf, "5"])
def test_one_shift_rule_for_every_schedule(model, shift):
    for kind in SCHEDULE_NAMES:
        with pytest.raises(ValueError, match="shift must be a positive finite number"):
            flow_schedule(4, shift, kind=kind)
    with pytest.raises(ValueError, match="shift must be a positive finite number"):
        Sampler(model, "dense", shift=shift)  # checked when the sampler is made, not at each call


def test_warmup_checks_its_arguments_before_tracing(model, inputs):
    noise, text, _ = inputs
    sampler = Sampler(model, "dense", progress=False)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        sampler.warmup(noise, text, num_steps=0)
    with pytest.raises(ValueError, match="plan must be a SchedulePlan"):
        sampler.warmup(noise, text, num_steps=4, plan="dense")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        sampler.warmup(noise, text[..., :-1], num_steps=4)
    assert sampler.trace_count == 0


def test_run_comparison_reports_and_draws(tmp_path):
    import json

    from models.evaluation.compare import run_comparison

    dfs = DFSConfig(density=0.5, density_decrement=0.2, dense_steps=2, refresh_interval=2,
                    tile_size=4, block_size=16)
    report = run_comparison("tiny", frames=9, height=128, width=64, steps=6, seed=3, dfs_config=dfs,
                            out_dir=str(tmp_path), progress=False)
    with open(report["report_json"]) as f:
        saved = json.load(f)
    assert saved["tokens"] == 3 * 8 * 4 and saved["num_key_blocks"] == 6
    assert saved["refresh_steps"] == [2, 4]
    assert saved["compiles"] == {"dense": 1, "dfs": 1}
    np.testing.assert_allclose(saved["sparsity"], saved["planned_sparsity"], rtol=1e-6)
    assert 0.0 < saved["relative_error"] < 1.0
    assert saved["time_per_step_s"]["dense"] > 0 and saved["speedup"] > 0
    # Each order keeps the same number of blocks per row: density 0.5 of 6 blocks = 3.
    assert saved["masks"]["kept_fraction"] == {"raster": 0.5, "hilbert3d": 0.5}
    assert (tmp_path / "masks_tiny.png").stat().st_size > 1000


def test_warmup_compiles_the_program_of_long_runs(model, inputs):
    noise, text, _ = inputs
    sampler = Sampler(model, "dense", progress=False, min_capacity=4)
    sampler.warmup(noise, text, num_steps=7)  # capacity 8: warms up with 5 steps
    assert sampler.trace_count == 1
    sampler(noise, text, num_steps=7)
    sampler(noise, text, num_steps=8)
    assert sampler.trace_count == 1
    sampler(noise, text, num_steps=9)  # capacity 16: a new program
    assert sampler.trace_count == 2


def test_warmup_matches_cache_capacity_of_dense_plans(model, inputs):
    """Density above max_density: the cache is sized by the plan, and warmup uses that size."""
    noise, text, neg = inputs
    dense_plan = DFSConfig(density=0.9, density_decrement=0.0, dense_steps=2, refresh_interval=2,
                           tile_size=4, block_size=16)
    sampler = Sampler(model, AttentionBackend("dfs", dense_plan), progress=False, max_density=0.5)
    sampler.warmup(noise, text, neg, num_steps=6)  # one step: no sparse step in its own plan
    result = sampler(noise, text, neg, num_steps=6)
    assert sampler.trace_count == 1
    assert result.cache.max_blocks == int(0.9 * NK)


@pytest.fixture(scope="module")
def tiny_sampler():
    model = WanTransformer3DModel("tiny", rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(5)
    noise = jnp.asarray(rng.normal(size=(1, model.config.in_channels, 3, 8, 8)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(1, 4, model.config.text_dim)), jnp.float32)
    return Sampler(model, "dense", progress=False), noise, text


@pytest.mark.parametrize("where", ["noise", "text", "negative_text", "guidance_scale"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_propagates_now_rejected_before_sampling(tiny_sampler, where, bad):
    """Finding: a NaN in the noise or ``guidance_scale=nan`` returned all-NaN latents; non-finite
    noise, prompt embeddings or guidance are rejected before sampling, naming the argument."""
    sampler, noise, text = tiny_sampler
    args = {"noise": noise, "text": text, "negative_text": text * 0.5, "guidance_scale": 5.0}
    args[where] = bad if where == "guidance_scale" else args[where].at[0, 0, 0].set(bad)
    before = sampler.trace_count
    with pytest.raises(ValueError, match=f"{where} must be finite"):
        sampler(args["noise"], args["text"], args["negative_text"], num_steps=2, guidance_scale=args["guidance_scale"])
    assert sampler.trace_count == before  # nothing was traced or run
