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

from helpers import rel_l2

from dfsattn_jax.joint import JointTokens, joint_density
from dfsattn_jax.schedule import DFSConfig, dfs_preset, reported_sparsity
from models.common.processor import AttentionState, make_backend
from models.sampling import Sampler, flow_match_euler_schedule, flow_schedule, make_schedule
from models.sampling.solvers import euler_step

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
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
