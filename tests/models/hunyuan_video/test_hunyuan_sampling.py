"""HunyuanVideo sampling: the pipeline's flow-matching Euler schedule and loop, against diffusers.

Fixtures (diffusers 0.42.1): ``flow_match_euler/`` (``make_hunyuan_sampling_fixture.py``: the
scheduler driven as the HunyuanVideo pipeline drives it, step by step for fixed model outputs)
and ``hunyuan_tiny/sampling.safetensors`` (``make_hunyuan_fixture.py``: the pipeline's 8-step
loop with the tiny transformer, embedded guidance 6, shift 7, float32).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import FIXTURES, rel_l2

from dfsattn_jax.joint import JointTokens, joint_density
from dfsattn_jax.schedule import DFSConfig, get_schedule_preset, reported_sparsity
from models.common.processor import AttentionState, make_backend
from models.sampling import Sampler, flow_match_euler_schedule, flow_schedule, make_schedule
from models.sampling.solvers import euler_step

FIXTURES = FIXTURES
STEPS = load_file(FIXTURES / "flow_match_euler" / "steps.safetensors")
CASES = json.loads((FIXTURES / "flow_match_euler" / "metadata.json").read_text())["cases"]
TINY = FIXTURES / "hunyuan_tiny"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_schedule_and_euler_steps_match_diffusers(case):
    """Sigmas and timesteps bit-exact; every Euler step to float32 rounding."""
    name, n = case["name"], case["num_steps"]
    sigmas, timesteps = flow_match_euler_schedule(n, case["shift"])
    assert sigmas.dtype == np.float32 and timesteps.dtype == np.float32
    np.testing.assert_array_equal(sigmas, STEPS[f"{name}/sigmas"])
    np.testing.assert_array_equal(timesteps, STEPS[f"{name}/timesteps"])
    schedule = make_schedule(n, shift=case["shift"], kind="flow-match-euler")
    sample = jnp.asarray(STEPS[f"{name}/sample0"])
    for i in range(n):
        sample, _ = euler_step(schedule, jnp.asarray(STEPS[f"{name}/model_outputs"][i]), sample, jnp.asarray(i))
        np.testing.assert_allclose(np.asarray(sample), STEPS[f"{name}/samples"][i], rtol=0, atol=2e-6)


def test_default_hunyuan_timesteps():
    """The research note's checked values at 50 steps, shift 7."""
    sigmas, timesteps = flow_schedule(50, 7.0, kind="flow-match-euler")
    np.testing.assert_allclose(timesteps[:4], [1000.0, 997.093, 994.083, 990.964], atol=1e-3)
    np.testing.assert_allclose(timesteps[-3:], [308.82, 225.81, 125.0], atol=1e-2)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and sigmas.shape == (51,)


def test_schedule_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        flow_schedule(5, 7.0, kind="karras")
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        flow_match_euler_schedule(0)
    with pytest.raises(ValueError, match="shift must be a positive finite number"):
        flow_match_euler_schedule(5, float("nan"))


# ------------------------------------------------------------------ the pipeline loop, tiny model

RTOL = 1e-5  # float32 end to end, as the model's equivalence with diffusers


@pytest.fixture(scope="module")
def model():
    from models.hunyuan_video.loading import load_hunyuan_video

    return load_hunyuan_video(TINY, dtype="float32")


def sampling_inputs():
    from models.hunyuan_video.transformer import HunyuanConditioning

    ref = load_file(TINY / "sampling.safetensors")
    meta = json.loads((TINY / "metadata.json").read_text())["sampling"]
    cond = HunyuanConditioning(
        jnp.asarray(ref["prompt_embeds"]), jnp.asarray(ref["prompt_attention_mask"]),
        jnp.asarray(ref["pooled_prompt_embeds"]), jnp.full((1,), meta["guidance_scale"], jnp.float32),
    )  # fmt: skip
    return ref, meta, cond


def test_pipeline_loop_matches_diffusers_step_by_step(model):
    """Each Euler step from diffusers' latents gives diffusers' next latents, and the Sampler's one
    jitted loop (embedded guidance, one batch, no CFG pass) gives its final latents."""
    ref, meta, cond = sampling_inputs()
    n, shift = meta["steps"], meta["flow_shift"]
    sigmas, timesteps = flow_match_euler_schedule(n, shift)
    np.testing.assert_array_equal(sigmas, ref["sigmas"])
    np.testing.assert_array_equal(timesteps, ref["timesteps"])
    schedule = make_schedule(n, shift=shift, kind="flow-match-euler")
    forward = jax.jit(lambda x, t: model.forward(x, t, cond, backend="dense")[0])
    x = jnp.asarray(ref["noise"])
    for i in range(n):
        v = forward(x, jnp.full((1,), timesteps[i], jnp.float32))
        stepped, _ = euler_step(schedule, v, x, jnp.asarray(i))
        err = rel_l2(stepped, ref["latents"][i])
        assert err <= RTOL, f"step {i}: relative L2 to diffusers {err:.2e}"
        x = jnp.asarray(ref["latents"][i])
    sampler = Sampler(model, "dense", solver="euler", shift=shift, schedule="flow-match-euler", progress=False)
    result = sampler(jnp.asarray(ref["noise"]), cond, num_steps=n)
    np.testing.assert_array_equal(result.timesteps, timesteps)
    err = rel_l2(result.latents, ref["latents"][-1])
    assert err <= RTOL, f"Sampler latents: relative L2 to diffusers {err:.2e}"


def io_inputs(seed: int = 0):
    """The io fixture's batch of 2 (valid text 38 and 9 of 64, guidance 6 and 3.5) as a
    conditioning, with seeded noise."""
    from models.hunyuan_video.transformer import HunyuanConditioning

    io = load_file(TINY / "io.safetensors")
    cond = HunyuanConditioning(
        jnp.asarray(io["encoder_hidden_states"]), jnp.asarray(io["encoder_attention_mask"]).astype(jnp.int32),
        jnp.asarray(io["pooled_projections"]), jnp.asarray(io["guidance"] / np.float32(1000.0)),
    )  # fmt: skip
    noise = jax.random.normal(jax.random.key(seed), io["hidden_states"].shape, jnp.float32)
    return noise, cond


TINY_DFS = dataclasses.replace(get_schedule_preset("hunyuan-video"), block_size=32, tile_size=8)


def test_dfs_at_full_density_equals_dense(model):
    noise, cond = io_inputs()
    dense = Sampler(model, "dense", shift=7.0, schedule="flow-match-euler", progress=False)(noise, cond, num_steps=4)
    dfs = dataclasses.replace(TINY_DFS, density=1.0, density_decrement=0.0, dense_steps=1, refresh_interval=2)
    sampler = Sampler(model, make_backend("dfs", dfs), shift=7.0, schedule="flow-match-euler", progress=False)
    result = sampler(noise, cond, num_steps=4)
    assert result.refresh_steps == (1, 3)
    np.testing.assert_allclose(result.skipped, 0.0, atol=1e-6)  # float32 mean of full rows
    assert rel_l2(result.latents, dense.latents) < RTOL


def test_default_schedule_sparsity_and_padded_text(model):
    """The hunyuan-video preset over 8 steps: the measured sparsity is the planned one (counted as
    the reference counts it), and other values in the padded text change no latent."""
    noise, cond = io_inputs(seed=1)
    sampler = Sampler(
        model, make_backend("dfs", TINY_DFS), shift=7.0, schedule="flow-match-euler", progress=False, max_density=None
    )
    dfs = dataclasses.replace(TINY_DFS, dense_steps=2, refresh_interval=2)
    result = sampler(noise, cond, num_steps=8, dfs=dfs)
    grid = model.check_inputs(noise, jnp.zeros((2,)), cond)
    joint = model.joint_tokens(grid, cond)
    assert joint == JointTokens(300, 64)
    plan = result.plan
    assert plan.refresh_steps == (2, 4, 6) and result.refresh_steps == (2, 4, 6)
    assert result.sparsity == pytest.approx(reported_sparsity(plan, 4, (), joint=joint, block_size=32), rel=1e-6)
    for s in np.flatnonzero(plan.sparse):
        assert result.skipped[s] == pytest.approx(1 - joint_density(int(plan.num_blocks[s]), joint, 32), rel=1e-6)
    assert result.sparsity > 0.2
    # Padded text: other embeddings there, same latents to the bit.
    mask = np.asarray(cond.prompt_attention_mask, bool)
    embeds = np.asarray(cond.prompt_embeds).copy()
    embeds[~mask] = np.random.default_rng(5).standard_normal(embeds[~mask].shape) * 4.0
    changed = sampler(noise, cond._replace(prompt_embeds=jnp.asarray(embeds)), num_steps=8, dfs=dfs)
    np.testing.assert_array_equal(np.asarray(changed.latents), np.asarray(result.latents))
    assert sampler.trace_count == 1  # one program for both runs


def test_auto_parallel_gives_an_embedded_guidance_model_its_heads(model):
    # No cond/uncond batch to split: "auto" picks heads (tiny has 2 heads), "guidance" stays available.
    assert Sampler(model, "dense", schedule="flow-match-euler", parallel=2, progress=False).parallel.mode == "heads"
    explicit = Sampler(model, "dense", schedule="flow-match-euler", parallel=2, parallel_mode="guidance", progress=False)
    assert explicit.parallel.mode == "guidance"


def test_sampler_rejects_bad_hunyuan_inputs(model):
    noise, cond = io_inputs()
    with pytest.raises(ValueError, match="flow-match-euler schedule runs the euler solver"):
        Sampler(model, "dense", solver="unipc", schedule="flow-match-euler")
    with pytest.raises(ValueError, match="schedule must be one of"):
        Sampler(model, "dense", schedule="linear")
    sampler = Sampler(model, "dense", schedule="flow-match-euler", progress=False)
    with pytest.raises(ValueError, match=r"text\.pooled_prompt_embeds must be finite"):
        sampler(noise, cond._replace(pooled_prompt_embeds=cond.pooled_prompt_embeds.at[0, 0].set(jnp.nan)), num_steps=2)
    with pytest.raises(ValueError, match=r"max_blocks must be in \[4, "):
        Sampler(model, make_backend("dfs", TINY_DFS), schedule="flow-match-euler", max_blocks=3, progress=False)(
            noise, cond, num_steps=14
        )
