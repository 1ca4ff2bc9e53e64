"""Two experts in one sampling program (Wan2.2 A14B; :mod:`models.sampling.experts`), on CPU at
the tiny config: the switch rule as diffusers applies it, the plan's refresh at the switch, the
loop against a written-out Euler loop over single-step calls, DFS at density 1 against dense,
one compiled program for any step count, the argument checks, and two devices against one.

Tolerances: float32 loops that differ only in loop structure, observed ~1e-7 relative; 1e-5 kept.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT

from dfsattn_jax.schedule import DFSConfig, plan_schedule
from models.common.processor import AttentionBackend, make_backend
from models.sampling import Sampler, flow_schedule
from models.sampling.experts import EXPERT_CACHE_MODES, check_experts, expert_switch, switch_plan
from models.wan.config import get_config
from models.wan.transformer import WanTransformer3DModel

CFG = get_config("tiny")
LATENT = (16, 2, 16, 16)  # token grid 2 x 8 x 8 = 128 tokens, 8 blocks of 16
TEXT_LEN = 5
F32_TOL = 1e-5
# 6 steps at shift 3: timesteps 999, 937, 857, 750, 600, 376; boundary 800 -> 3 high-noise steps.
STEPS, SHIFT, BOUNDARY, SWITCH = 6, 3.0, 800.0, 3
# Dense steps 0-1, refreshes at 2 and 5 (interval 3): the switch at step 3 falls between them.
DFS = DFSConfig(density=0.5, density_decrement=0.0, dense_steps=2, refresh_interval=3,
                tile_size=4, block_size=16, dense_layers=(0,))  # fmt: skip


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tiny(seed: int, config=CFG) -> WanTransformer3DModel:
    m = WanTransformer3DModel(config, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(seed + 100)
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    leaves = [jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32)) for x in leaves]
    nnx.update(m, jax.tree.unflatten(treedef, leaves))
    return m


@pytest.fixture(scope="module")
def experts():
    return _tiny(0), _tiny(1)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((1, *LATENT), np.float32))
    text, neg = (jnp.asarray(rng.standard_normal((1, TEXT_LEN, CFG.text_dim), np.float32)) for _ in range(2))
    return noise, text, neg


def _sampler(experts, backend="dense", **kw) -> Sampler:
    high, low = experts
    return Sampler(high, backend, solver="euler", shift=SHIFT, progress=False, model_2=low, boundary=BOUNDARY, **kw)


def test_the_switch_compares_in_float32_as_torch_does():
    timesteps = np.array([999, 875, 874, 500], np.int64)
    assert expert_switch(timesteps, 875.0) == 2  # t >= boundary: 875 is the high-noise expert's
    assert expert_switch(timesteps, 875.00000001) == 2  # torch: int64 tensor >= Python float in float32
    assert expert_switch(timesteps, 875.5) == 1
    assert expert_switch(timesteps, 999.5) == 0 and expert_switch(timesteps, 1.0) == 4
    with pytest.raises(ValueError, match="more than once"):
        expert_switch(np.array([999, 500, 900]), 875.0)
    _, ts = flow_schedule(STEPS, SHIFT)
    assert ts.tolist() == [999, 937, 857, 750, 600, 376] and expert_switch(ts, BOUNDARY) == SWITCH


def test_the_plan_refreshes_at_the_first_sparse_step_of_the_second_expert():
    plan = plan_schedule(DFS, STEPS, 8)
    assert plan.refresh_steps == (2, 5)
    refreshed = switch_plan(plan, SWITCH, "refresh")
    assert refreshed.refresh_steps == (2, 3, 5)
    assert switch_plan(refreshed, SWITCH, "refresh").refresh_steps == (2, 3, 5)  # idempotent
    np.testing.assert_array_equal(refreshed.sparse, plan.sparse)
    np.testing.assert_array_equal(refreshed.num_blocks, plan.num_blocks)
    assert switch_plan(plan, SWITCH, "carry") is plan
    assert switch_plan(plan, 1, "refresh").refresh_steps == (2, 5)  # in the dense warm-up: 2 refreshes anyway
    assert switch_plan(plan, 0, "refresh") is plan and switch_plan(plan, STEPS, "refresh") is plan
    assert switch_plan(None, SWITCH, "refresh") is None
    assert EXPERT_CACHE_MODES == ("refresh", "carry")


def _euler_reference(experts, inputs, scales, switch):
    """Euler over single-step calls: the high-noise expert for ``switch`` steps, then the other."""
    noise, text, neg = inputs
    sigmas, timesteps = flow_schedule(STEPS, SHIFT)
    backend = make_backend("dense")
    x = noise
    for i in range(STEPS):
        expert, scale = (experts[0], scales[0]) if i < switch else (experts[1], scales[1])
        t = jnp.full((2,), float(timesteps[i]), jnp.float32)
        v, _ = expert(jnp.concatenate([x, x]), t, jnp.concatenate([text, neg]), backend=backend)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v[1:] + scale * (v[:1] - v[1:]))
    return x


def test_two_experts_run_each_its_steps_with_its_guidance(experts, inputs):
    noise, text, neg = inputs
    sampler = _sampler(experts)
    result = sampler(noise, text, neg, num_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.5)
    assert result.switch_step == sampler.switch_step(STEPS) == SWITCH
    assert _rel(result.latents, _euler_reference(experts, inputs, (5.0, 2.5), SWITCH)) < F32_TOL
    # guidance_scale_2 defaults to guidance_scale; neither changes the program.
    same = sampler(noise, text, neg, num_steps=STEPS, guidance_scale=5.0)
    assert _rel(same.latents, _euler_reference(experts, inputs, (5.0, 5.0), SWITCH)) < F32_TOL
    assert _rel(same.latents, result.latents) > 1e-3
    # Other step counts move the switch (4 steps: 999, 900, 750, 501 -> 2) in the same program.
    four = sampler(noise, text, neg, num_steps=4, guidance_scale=5.0, guidance_scale_2=2.5)
    assert four.switch_step == 2
    assert sampler.trace_count == 1


def test_one_expert_alone_equals_the_single_model_sampler(experts, inputs):
    """A boundary above every timestep gives every step to model_2, below every one to model; the
    same weights as both experts give the single-model loop."""
    noise, text, neg = inputs
    high, low = experts
    single = Sampler(low, "dense", solver="euler", shift=SHIFT, progress=False)
    want = single(noise, text, neg, num_steps=STEPS, guidance_scale=2.5).latents
    late = Sampler(high, "dense", solver="euler", shift=SHIFT, progress=False, model_2=low, boundary=999.5)
    got = late(noise, text, neg, num_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.5)
    assert got.switch_step == 0 and _rel(got.latents, want) < F32_TOL
    twice = Sampler(low, "dense", solver="euler", shift=SHIFT, progress=False, model_2=low, boundary=BOUNDARY)
    assert _rel(twice(noise, text, neg, num_steps=STEPS, guidance_scale=2.5).latents, want) < F32_TOL


@pytest.mark.parametrize("mode", EXPERT_CACHE_MODES)
def test_dfs_at_density_one_equals_dense_and_refreshes_at_the_switch(experts, inputs, mode):
    noise, text, neg = inputs
    full = dataclasses.replace(DFS, density=1.0)
    dense = _sampler(experts)(noise, text, neg, num_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.5)
    sampler = _sampler(experts, AttentionBackend("dfs", full), expert_cache=mode, max_density=1.0)
    result = sampler(noise, text, neg, num_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.5)
    assert _rel(result.latents, dense.latents) < F32_TOL
    assert result.refresh_steps == ((2, 3, 5) if mode == "refresh" else (2, 5))
    assert result.plan.refresh_steps == result.refresh_steps


def test_the_expert_arguments_are_checked(experts, inputs):
    high, low = experts
    noise, text, neg = inputs
    with pytest.raises(ValueError, match="boundary must be a number"):
        Sampler(high, model_2=low)
    with pytest.raises(ValueError, match="boundary must be a timestep in"):
        Sampler(high, model_2=low, boundary=1000.0)
    with pytest.raises(ValueError, match="boundary is where model_2 takes over"):
        Sampler(high, boundary=875.0)
    with pytest.raises(ValueError, match="expert_cache must be one of"):
        Sampler(high, model_2=low, boundary=875.0, expert_cache="share")
    with pytest.raises(ValueError, match=r"model_2 must have model's config.num_layers=2, got 3"):
        check_experts(high, _tiny(3, CFG.replace(num_layers=3)))
    single = Sampler(high, "dense", progress=False)
    with pytest.raises(ValueError, match="guidance_scale_2 is the second expert's"):
        single(noise, text, neg, num_steps=2, guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="guidance_scale_2 must be finite"):
        _sampler(experts)(noise, text, neg, num_steps=2, guidance_scale_2=float("nan"))
    with pytest.raises(ValueError, match=r"condition must be \[B, C, F, H, W\] with noise's B, F, H, W"):
        single(noise, text, neg, num_steps=2, condition=jnp.zeros((1, 4, 1, 16, 16)))
    with pytest.raises(ValueError, match="channels"):  # the model's own check: 16 + 4 is not its in_channels
        single(noise, text, neg, num_steps=2, condition=jnp.zeros((1, 4, *LATENT[1:])))
    assert single.trace_count == 0


_PARALLEL_SCRIPT = """
import sys
sys.path[:0] = ["tests", "tests/sampling"]
import jax.numpy as jnp, numpy as np
from test_experts import BOUNDARY, CFG, DFS, LATENT, SHIFT, TEXT_LEN, _rel, _tiny
from models.common.parallel import Parallelism
from models.common.processor import AttentionBackend
from models.sampling import Sampler
cfg = CFG.replace(name="tiny-4h", num_heads=4)
high, low = _tiny(0, cfg), _tiny(1, cfg)
rng = np.random.default_rng(2)
noise = jnp.asarray(rng.standard_normal((1, *LATENT), np.float32))
text, neg = (jnp.asarray(rng.standard_normal((1, TEXT_LEN, cfg.text_dim), np.float32)) for _ in range(2))
runs = {}
for mesh in (None, (2, 1), (1, 2)):
    sampler = Sampler(high, AttentionBackend("dfs", DFS), solver="unipc", shift=SHIFT, progress=False, model_2=low,
                      boundary=BOUNDARY, parallel=None if mesh is None else Parallelism(*mesh))
    runs[mesh] = sampler(noise, text, neg, num_steps=6, guidance_scale=5.0, guidance_scale_2=2.5)
    assert runs[mesh].refresh_steps == (2, 3, 5) and sampler.trace_count == 1
print(max(_rel(runs[m].latents, runs[None].latents) for m in ((2, 1), (1, 2))))
"""


def test_two_experts_on_two_devices_equal_one():
    """Guidance- and head-parallel (two host devices, in a subprocess: XLA_FLAGS must be set
    before JAX starts): both experts' weights go onto the mesh; UniPC with DFS."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    done = subprocess.run([sys.executable, "-c", _PARALLEL_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < F32_TOL
