"""Flow-matching UniPC multistep solver (bh2, order 2, predict-x0), as Wan2.1 samples.

This is diffusers' ``UniPCMultistepScheduler`` configured the way the Wan2.1 pipelines configure
it (``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``, ``solver_type="bh2"``,
``solver_order=2``, ``predict_x0=True``, ``lower_order_final=True``, no disabled corrector,
``final_sigmas_type="zero"``, ``timestep_spacing="linspace"``), written as two pure functions
usable inside ``lax.fori_loop``:

``unipc_init(schedule, sample) -> UniPCState`` and
``unipc_step(state, model_output, sample, step_index) -> (new_sample, new_state)``,

also exported as ``init`` / ``step``: the solver protocol of :mod:`models.sampling.solvers`, whose
``get_solver("unipc")`` finds them by name. ``step_index`` and the number of steps may be
traced (the sampler pads its schedule to a static capacity and carries ``num_steps``).

Notation (``N`` steps, ``sigma_N = 0``): ``alpha = 1 - sigma``, ``lambda = log(alpha) -
log(sigma)``. The model predicts the flow ``v`` at ``(x_i, sigma_i)``; the data prediction is
``x0_i = x_i - sigma_i * v_i`` (computed from the *uncorrected* sample ``x_i``). Step ``i``:

1. UniC corrector (``i >= 1``): recomputes the sample of this step from the sample the previous
   predictor started from (``last_sample``), the data predictions ``x0_{i-1}`` (and ``x0_{i-2}``)
   and the new one ``x0_i``. Its order is the previous predictor's order (1 at ``i = 1``, else 2);
   order 2 solves the 2x2 system ``R rho = b`` of the B(h) = expm1(-h) ("bh2") variant.
2. UniP predictor from the corrected sample to ``sigma_{i+1}``, order ``min(2, i + 1, N - i)``
   (warm-up at the start, ``lower_order_final`` at the end): order 1 is the exponential
   integrator step ``sigma_{i+1}/sigma_i x - alpha_{i+1} expm1(-h) x0_i``; order 2 adds the
   ``rho = 1/2`` finite-difference term with ``x0_{i-1}``.

The last step (``sigma_N = 0``, ``lambda = +inf``) is order 1 and returns exactly ``x0_{N-1}``.

All scalar coefficients are computed in float32 with the same operations, in the same order, as
diffusers (its sigmas are float32 tensors), so results agree to float32 rounding. The sample
returned has the dtype of ``sample``; arithmetic is float32 (or wider if the inputs are).

The schedule helpers :func:`flow_sigmas` and :func:`flow_timesteps` reproduce diffusers'
``set_timesteps`` exactly, including the ``1e-6`` nudge of the first sigma and the truncation
of the timesteps to integers (what the Wan pipeline feeds the transformer).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_positive_int

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "UniPCState",
    "check_shift",
    "flow_sigmas",
    "flow_timesteps",
    "unipc_init",
    "unipc_step",
    "unipc_orders",
    "init",
    "step",
]

NUM_TRAIN_TIMESTEPS = 1000


def check_shift(shift: float) -> float:
    """``shift`` as a Python float if it is a positive finite real number (not a bool), else a
    ``ValueError`` naming ``shift``: the one rule of every flow-matching schedule."""
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    return float(shift)


def _shifted_sigmas_f64(num_steps: int, shift: float, num_train_timesteps: int) -> np.ndarray:
    """diffusers' float64 flow sigmas before the final zero: ``[N]``."""
    sigmas = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    if abs(sigmas[0] - 1.0) < 1e-6:
        # diffusers nudges sigma_0 below 1 so that log(alpha_0) is finite.
        sigmas[0] -= 1e-6
    return sigmas


def _unipc_schedule(num_steps: int, shift: float, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(flow_sigmas, flow_timesteps)`` of checked arguments (no checks here): float32[N + 1]
    and int64[N], from one computation of the float64 sigmas."""
    sigmas = _shifted_sigmas_f64(num_steps, shift, num_train_timesteps)
    return (
        np.concatenate([sigmas, [0.0]]).astype(np.float32),
        (sigmas * num_train_timesteps).astype(np.int64),
    )


def flow_sigmas(
    num_steps: int, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """The flow-matching sigmas ``[N + 1]`` (float32, decreasing from ~1, last entry 0).

    ``sigma = shift * s / (1 + (shift - 1) * s)`` for ``s = linspace(1, 1/T, N + 1)[:-1]``,
    ``sigma_0`` nudged by ``-1e-6`` when it equals 1, then a final ``0`` appended.

    Raises:
      ValueError: if ``num_steps < 1`` or ``shift`` is not positive.
    """
    return _unipc_schedule(check_positive_int(num_steps, "num_steps"), check_shift(shift), num_train_timesteps)[0]


def flow_timesteps(
    num_steps: int, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """The timesteps ``[N]`` (int64) the Wan pipeline passes to the transformer at each step.

    ``trunc(sigma * T)`` computed from the float64 sigmas, as diffusers does (so the first
    timestep is 999, not 1000).

    Raises:
      ValueError: if ``num_steps < 1`` or ``shift`` is not positive.
    """
    return _unipc_schedule(check_positive_int(num_steps, "num_steps"), check_shift(shift), num_train_timesteps)[1]


def unipc_orders(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictor and corrector orders per step, ``int32[N]`` each (corrector 0 = not used).

    Predictor: ``min(2, i + 1, N - i)``; corrector at ``i >= 1``: the predictor order of ``i - 1``.
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    i = np.arange(num_steps)
    predictor = np.minimum(np.minimum(2, i + 1), num_steps - i).astype(np.int32)
    corrector = np.concatenate([[0], predictor[:-1]]).astype(np.int32)
    return predictor, corrector


class UniPCState(NamedTuple):
    """UniPC solver state (a pytree; every leaf is an array).

    Attributes:
      sigmas: float32 ``[P + 1]``; ``sigmas[:N + 1]`` is the schedule (``sigmas[N] = 0``), any
        entries after it are padding (never read).
      num_steps: int32 ``[]``, ``N`` (may be traced: one compiled loop serves every ``N <= P``).
      x0_prev: data prediction of the previous step, ``x0_{i-1}`` (zeros before step 1).
      x0_prev2: data prediction two steps back, ``x0_{i-2}`` (zeros before step 2).
      last_sample: the (corrected) sample the previous predictor started from.
    """

    sigmas: Float[Array, " n1"]
    num_steps: Int[Array, ""]
    x0_prev: Float[Array, "..."]
    x0_prev2: Float[Array, "..."]
    last_sample: Float[Array, "..."]


def _schedule_arrays(schedule: Any) -> tuple[Any, Any]:
    """``(sigmas, num_steps)`` of a schedule: an array, or an object with ``sigmas`` (and
    optionally a ``num_steps``, e.g. :class:`models.sampling.schedule.FlowSchedule` with padded arrays)."""
    sigmas = getattr(schedule, "sigmas", schedule)
    num_steps = getattr(schedule, "num_steps", None)
    if sigmas is None:
        raise ValueError("schedule must be a sigma array [N + 1] or have a `sigmas` attribute")
    if not isinstance(sigmas, jax.Array):
        sigmas = np.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"schedule sigmas must have shape [num_steps + 1] with num_steps >= 1, got {sigmas.shape}")
    if num_steps is None:
        num_steps = sigmas.shape[0] - 1
    if isinstance(sigmas, np.ndarray) and isinstance(num_steps, (int, np.integer)):
        n = int(num_steps)
        if not 1 <= n <= sigmas.shape[0] - 1:
            raise ValueError(f"schedule num_steps must be in [1, {sigmas.shape[0] - 1}], got {n}")
        head = sigmas[: n + 1]
        if not np.all(np.isfinite(head)) or np.any(head[:-1] <= 0) or np.any(head >= 1) or head[-1] != 0:
            raise ValueError(
                "schedule sigmas must lie in (0, 1) and end with 0 (flow matching), "
                f"got first {head[0]!r} and last {head[-1]!r}"
            )
    return sigmas, num_steps


def unipc_init(schedule: Any, sample: Float[Array, "..."]) -> UniPCState:
    """Fresh solver state for ``sample`` (any shape, e.g. latents ``[B, C, F, H, W]``).

    Args:
      schedule: the sigmas ``[N + 1]`` (e.g. :func:`flow_sigmas`), or an object with a
        ``sigmas`` attribute holding them and optionally ``num_steps`` (then ``sigmas`` may
        be padded past ``N + 1``; :class:`models.sampling.schedule.FlowSchedule` is such an object).
      sample: the initial noise ``x_0`` (only its shape and dtype are used).

    Raises:
      ValueError: if concrete sigmas are not a flow-matching schedule in ``(0, 1)`` ending
        with 0.
    """
    sigmas, num_steps = _schedule_arrays(schedule)
    zeros = jnp.zeros(sample.shape, jnp.promote_types(sample.dtype, jnp.float32))
    return UniPCState(
        sigmas=jnp.asarray(sigmas, dtype=jnp.float32),
        num_steps=jnp.asarray(num_steps, dtype=jnp.int32),
        x0_prev=zeros,
        x0_prev2=zeros,
        last_sample=zeros,
    )


def _lambda(sigma: Float[Array, ""]) -> Float[Array, ""]:
    """log-SNR of the flow parametrisation: ``log(1 - sigma) - log(sigma)``."""
    return jnp.log(1.0 - sigma) - jnp.log(sigma)


def _bh2_step(s_from, s_to):
    """Coefficients of one UniPC step between flow sigmas ``s_from`` → ``s_to``:
    ``(alpha_t, sigma_t, sigma_s0, lambda_s0, h, expm1(-h))`` with ``alpha = 1 - sigma``."""
    lambda_s0 = _lambda(s_from)
    h = _lambda(s_to) - lambda_s0
    return 1.0 - s_to, s_to, s_from, lambda_s0, h, jnp.expm1(-h)


def unipc_step(
    state: UniPCState,
    model_output: Float[Array, "..."],
    sample: Float[Array, "..."],
    step_index: int | Int[Array, ""],
) -> tuple[Float[Array, "..."], UniPCState]:
    """One UniPC step: corrector for this step (``i >= 1``) then predictor to ``sigma_{i+1}``.

    Args:
      state: from :func:`unipc_init` or the previous step.
      model_output: the flow prediction ``v`` at ``(sample, sigma_i)``, same shape as ``sample``.
      sample: the current sample ``x_i`` (what the previous step returned).
      step_index: ``i`` in ``[0, N)``; a Python int or a traced int32 scalar.

    Returns:
      ``(x_{i+1}, new_state)``; ``x_{i+1}`` has ``sample``'s dtype.
    """
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output shape {model_output.shape} must equal sample shape {sample.shape}")
    if state.x0_prev.shape != sample.shape:
        raise ValueError(f"sample shape {sample.shape} does not match the state's {state.x0_prev.shape}")
    num_steps = state.num_steps
    last = state.sigmas.shape[0] - 1
    compute = state.x0_prev.dtype
    i = jnp.asarray(step_index, jnp.int32)
    sig = state.sigmas
    s_im2 = sig[jnp.maximum(i - 2, 0)]
    s_im1 = sig[jnp.maximum(i - 1, 0)]
    s_i = sig[i]
    s_ip1 = sig[jnp.minimum(i + 1, last)]

    x = sample.astype(compute)
    v = model_output.astype(compute)
    x0 = x - s_i * v  # diffusers' convert_model_output for flow_prediction

    # ---- UniC corrector (bh2), order 1 at i == 1, order 2 for i >= 2; skipped at i == 0 ----
    alpha_t, sigma_t, sigma_s0, lambda_s0, h, h_phi_1 = _bh2_step(s_im1, s_i)
    hh, b_h = -h, h_phi_1  # bh2: B(h) = expm1(-h)
    c_order2 = i >= 2
    r1 = jnp.where(c_order2, (_lambda(s_im2) - lambda_s0) / h, 1.0)
    h_phi_k = h_phi_1 / hh - 1.0
    b1 = h_phi_k * 1.0 / b_h
    h_phi_k = h_phi_k / hh - 1.0 / 2.0
    b2 = h_phi_k * 2.0 / b_h
    # R = [[1, 1], [r1, 1]]: rho = R^{-1} b (diffusers uses torch.linalg.solve).
    rho0_2 = (b1 - b2) / (1.0 - r1)
    rho1_2 = b1 - rho0_2
    rho0 = jnp.where(c_order2, rho0_2, 0.0)
    rho1 = jnp.where(c_order2, rho1_2, 0.5)
    m0, m1 = state.x0_prev, state.x0_prev2
    x_t_ = sigma_t / sigma_s0 * state.last_sample - alpha_t * h_phi_1 * m0
    d1 = (m1 - m0) / r1
    corr_res = rho0 * d1
    d1_t = x0 - m0
    corrected = x_t_ - alpha_t * b_h * (corr_res + rho1 * d1_t)
    x = jnp.where(i >= 1, corrected.astype(x.dtype), x)

    # ---- UniP predictor (bh2): order min(2, i + 1, N - i); rho_p = 1/2 for order 2 ----
    alpha_t, sigma_t, sigma_s0, lambda_s0, h, h_phi_1 = _bh2_step(s_i, s_ip1)
    b_h = h_phi_1  # bh2: B(h) = expm1(-h)
    p_order2 = (i >= 1) & (i < num_steps - 1)
    rk = jnp.where(p_order2, (_lambda(s_im1) - lambda_s0) / h, 1.0)
    rho_p = jnp.where(p_order2, 0.5, 0.0)
    m0, m1 = x0, state.x0_prev
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    pred_res = rho_p * ((m1 - m0) / rk)
    x_next = x_t_ - alpha_t * b_h * pred_res

    new_state = state._replace(x0_prev=x0, x0_prev2=state.x0_prev, last_sample=x)
    return x_next.astype(sample.dtype), new_state


# The solver protocol of models.sampling.solvers (``get_solver("unipc")`` picks these up by name).
init = unipc_init
step = unipc_step
