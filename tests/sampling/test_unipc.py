"""UniPC (flow matching, bh2, order 2) parity with diffusers' UniPCMultistepScheduler.

The reference numbers come from ``tests/fixtures/unipc_flow`` (made by
``tests/fixtures/make_wan_fixture.py`` with diffusers, see its metadata.json): for a fixed random
sequence of model outputs, the sample diffusers returns after every step. The JAX solver is fed
the same model outputs and must return the same samples to float32 rounding.
"""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import FIXTURES, rel_l2

from models.sampling.unipc import UniPCState, flow_sigmas, flow_timesteps, unipc_init, unipc_orders, unipc_step

FIXTURE = FIXTURES / "unipc_flow"
CASES = [c for c in json.loads((FIXTURE / "metadata.json").read_text())["cases"]]
# float32 solver arithmetic (diffusers keeps sigmas and samples in float32): each step rounds at
# ~6e-8 relative; coefficients differ from torch's by a few ulps (closed-form 2x2 solve instead of
# LU, XLA's log/expm1). Observed worst case 7e-7 (20 steps); 4e-6 leaves a 5x margin, while a
# wrong coefficient or order changes samples by >= 1e-2.
RTOL = 4e-6


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "unipc_steps.safetensors")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_schedule_matches_diffusers(case, ref):
    name, n, shift = case["name"], case["num_steps"], case["flow_shift"]
    np.testing.assert_array_equal(flow_sigmas(n, shift), ref[f"{name}/sigmas"])
    np.testing.assert_array_equal(flow_timesteps(n, shift), ref[f"{name}/timesteps"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_step_by_step_parity(case, ref):
    """Eager steps (Python int step index), each compared with diffusers' sample."""
    name, n, shift = case["name"], case["num_steps"], case["flow_shift"]
    outputs, samples = ref[f"{name}/model_outputs"], ref[f"{name}/samples"]
    sample = jnp.asarray(ref[f"{name}/sample0"])
    state = unipc_init(flow_sigmas(n, shift), sample)
    step = jax.jit(unipc_step)
    for i in range(n):
        sample, state = step(state, jnp.asarray(outputs[i]), sample, i)
        chex.assert_tree_all_finite(sample)
        err = rel_l2(sample, samples[i])
        assert err <= RTOL, f"{name}: step {i} relative L2 {err:.2e}"
    # The last step returns the data prediction x0 = x - sigma * v exactly (sigma_N = 0).
    np.testing.assert_allclose(
        np.asarray(sample), np.asarray(state.x0_prev), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["steps10_shift5", "steps20_shift3"])
def test_fori_loop_parity(name, ref):
    """The solver inside lax.fori_loop with a traced step index gives diffusers' final sample."""
    case = next(c for c in CASES if c["name"] == name)
    n, shift = case["num_steps"], case["flow_shift"]
    outputs = jnp.asarray(ref[f"{name}/model_outputs"])
    sample0 = jnp.asarray(ref[f"{name}/sample0"])

    @jax.jit
    def run(sample0, outputs):
        state = unipc_init(flow_sigmas(n, shift), sample0)

        def body(i, carry):
            sample, state = carry
            return unipc_step(state, outputs[i], sample, i)

        return jax.lax.fori_loop(0, n, body, (sample0, state))

    final, state = run(sample0, outputs)
    assert isinstance(state, UniPCState)
    err = rel_l2(final, ref[f"{name}/samples"][-1])
    assert err <= RTOL, f"final sample relative L2 {err:.2e}"


def test_orders_lower_order_final():
    pred, corr = unipc_orders(6)
    np.testing.assert_array_equal(pred, [1, 2, 2, 2, 2, 1])
    np.testing.assert_array_equal(corr, [0, 1, 2, 2, 2, 2])
    pred1, corr1 = unipc_orders(1)
    np.testing.assert_array_equal(pred1, [1])
    np.testing.assert_array_equal(corr1, [0])


def test_dtype_preserved_and_schedule_object():
    """A bf16 sample stays bf16; a schedule object with a `sigmas` attribute is accepted."""

    class Sched:
        sigmas = flow_sigmas(4, 5.0)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 4, 2, 4, 4)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    state = unipc_init(Sched(), x)
    assert state.x0_prev.dtype == jnp.float32
    y, state = jax.jit(unipc_step)(state, v, x, 1)
    assert y.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(y)


def test_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, shift=-1.0)
    with pytest.raises(ValueError, match="sigmas"):
        unipc_init(np.array([1.5, 0.5, 0.0], np.float32), jnp.ones((2,)))
    with pytest.raises(ValueError, match="sigmas"):
        unipc_init(np.array([0.9, 0.5, 0.1], np.float32), jnp.ones((2,)))
    state = unipc_init(flow_sigmas(3), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="model_output"):
        unipc_step(state, jnp.ones((2, 4)), jnp.ones((2, 3)), 0)


def test_sampler_protocol_padded_schedule_traced_steps(ref):
    """Through models.sampling.loop's solver protocol: a FlowSchedule padded to 64 steps, the number of
    steps and the step index traced, one compiled loop for two step counts."""
    from models.sampling import FlowSchedule, get_solver

    solver = get_solver("unipc")
    assert solver.init is unipc_init and solver.step is unipc_step
    traces = []

    @jax.jit
    def run(schedule, sample0, outputs):
        traces.append(1)
        state = solver.init(schedule, sample0)

        def body(i, carry):
            sample, state = carry
            return solver.step(state, outputs[i], sample, i)

        return jax.lax.fori_loop(0, schedule.num_steps, body, (sample0, state))[0]

    capacity = 64
    for name in ("steps10_shift5", "steps3_shift5"):
        case = next(c for c in CASES if c["name"] == name)
        n, shift = case["num_steps"], case["flow_shift"]
        sig = np.zeros(capacity + 1, np.float32)
        sig[: n + 1] = flow_sigmas(n, shift)
        ts = np.zeros(capacity, np.float32)
        ts[:n] = flow_timesteps(n, shift)
        schedule = FlowSchedule(jnp.asarray(sig), jnp.asarray(ts), jnp.asarray(n, jnp.int32))
        outputs = np.zeros((capacity,) + ref[f"{name}/sample0"].shape, np.float32)
        outputs[:n] = ref[f"{name}/model_outputs"]
        final = run(schedule, jnp.asarray(ref[f"{name}/sample0"]), jnp.asarray(outputs))
        err = rel_l2(final, ref[f"{name}/samples"][-1])
        assert err <= RTOL, f"{name}: final sample relative L2 {err:.2e}"
    assert len(traces) == 1
