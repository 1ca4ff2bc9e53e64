"""The DFSAttn configuration and step schedule (docs/spec.md §6).

At diffusion step ``s``:

- ``s < dense_steps``: dense attention everywhere.
- ``s >= dense_steps``: sparse attention in every sparse layer. With
  ``r = (s - dense_steps) // refresh_interval`` and ``last = ceil(density / decrement) - 1``
  (unbounded when the decrement is 0), the mask is refreshed when
  ``(s - dense_steps) % refresh_interval == 0`` and ``r <= last``; the density in force is
  ``density - min(r, last) * decrement``.

With the defaults over 50 steps: dense 0–11, refreshes at 12, 24, 36 with densities 0.3,
0.2, 0.1 (177, 118, 59 of 591 key blocks), and the step-36 mask stays until the end.

Named presets (:data:`SCHEDULE_PRESETS`, :func:`get_schedule_preset`): ``"wan2.1"`` is
``DFSConfig()`` (layer 0 always dense, as the reference runs Wan2.1); ``"hunyuan-video"`` is the
reference's HunyuanVideo schedule, the same steps and densities with no always-dense layer
(docs/spec.md §6.1); ``"fast"`` is the schedule search's choice (benchmarks/schedule_search.py).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jaxtyping import Bool, Float64, Int32

from dfsattn_jax.checks import check_density, check_nonnegative_int, check_positive_int, check_tile_size, lookup
from dfsattn_jax.joint import JointTokens, joint_density
from dfsattn_jax.layout import blocks_for_density
from dfsattn_jax.orders import ORDER_NAMES

__all__ = [
    "DFSConfig",
    "SCHEDULE_PRESETS",
    "SchedulePlan",
    "SchedulePreset",
    "default_schedule",
    "get_schedule_preset",
    "plan_schedule",
    "reported_sparsity",
]


@dataclasses.dataclass(frozen=True)
class DFSConfig:
    """DFSAttn hyper-parameters (docs/spec.md §3, §6). Validated on construction.

    Attributes:
      density: kept fraction of key blocks at the first refresh, in (0, 1].
      density_decrement: density dropped at each later refresh, >= 0 (0: refresh forever
        at ``density``).
      dense_steps: leading diffusion steps that run dense attention.
      refresh_interval: diffusion steps between mask refreshes, >= 1.
      tile_size: tokens per scoring tile; divides ``block_size``.
      block_size: tokens per attention block.
      order: token order (one of :data:`dfsattn_jax.orders.ORDER_NAMES`).
      dense_layers: self-attention layers that always stay dense.
    """

    density: float = 0.3
    density_decrement: float = 0.1
    dense_steps: int = 12
    refresh_interval: int = 12
    tile_size: int = 16
    block_size: int = 128
    order: str = "hilbert3d"
    dense_layers: tuple[int, ...] = (0,)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("density", check_density(self.density, "density"))
        try:
            decrement = float(self.density_decrement)
        except (TypeError, ValueError):
            raise ValueError(f"density_decrement must be a number >= 0, got {self.density_decrement!r}") from None
        if not (math.isfinite(decrement) and 0.0 <= decrement <= 1.0):
            raise ValueError(f"density_decrement must be in [0, 1], got {self.density_decrement!r}")
        set_("density_decrement", decrement)
        set_("dense_steps", check_nonnegative_int(self.dense_steps, "dense_steps"))
        set_("refresh_interval", check_positive_int(self.refresh_interval, "refresh_interval"))
        tile, block = check_tile_size(self.tile_size, self.block_size)
        set_("tile_size", tile)
        set_("block_size", block)
        if self.order not in ORDER_NAMES:
            raise ValueError(f"order must be one of {ORDER_NAMES}, got {self.order!r}")
        try:
            layers = tuple(check_nonnegative_int(i, "dense_layers entries") for i in self.dense_layers)
        except TypeError:
            raise ValueError(f"dense_layers must be a sequence of layer indices, got {self.dense_layers!r}") from None
        set_("dense_layers", layers)

    @property
    def last_interval(self) -> int | None:
        """Last refresh interval ``r`` that refreshes, ``None`` when unbounded (decrement 0)."""
        if self.density_decrement == 0.0:
            return None
        last = math.ceil(self.density / self.density_decrement) - 1
        # Guard against a float ratio just above an integer (density would reach <= 0).
        while last > 0 and self.density - last * self.density_decrement <= 0.0:
            last -= 1
        return last


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    """Per-step plan of one sampling run (arrays of length ``num_steps``).

    Attributes:
      sparse: whether sparse attention runs at the step.
      refresh: whether the mask is recomputed at the step.
      density: density in force (1.0 at dense steps).
      num_blocks: key blocks kept per query block in force (``num_key_blocks`` at dense steps).
      max_blocks: largest ``num_blocks`` over the sparse steps (the cache's ``K_max``); 0 when
        no step is sparse (then no cache is needed).
      num_key_blocks: key blocks per row of the attention.
    """

    sparse: Bool[np.ndarray, " s"]
    refresh: Bool[np.ndarray, " s"]
    density: Float64[np.ndarray, " s"]
    num_blocks: Int32[np.ndarray, " s"]
    max_blocks: int
    num_key_blocks: int

    @property
    def num_steps(self) -> int:
        return int(self.sparse.shape[0])

    @property
    def refresh_steps(self) -> tuple[int, ...]:
        """Steps at which the mask is refreshed."""
        return tuple(int(s) for s in np.flatnonzero(self.refresh))


def plan_schedule(config: DFSConfig, num_steps: int, num_key_blocks: int) -> SchedulePlan:
    """Plans ``num_steps`` diffusion steps under ``config`` (docs/spec.md §6).

    Args:
      config: the DFSAttn configuration.
      num_steps: diffusion steps of the run (>= 1; steps count diffusion steps, whatever the
        guidance).
      num_key_blocks: ``ceil(L / block_size)`` of the video self-attention.
    """
    if not isinstance(config, DFSConfig):
        raise ValueError(f"config must be a DFSConfig, got {type(config).__name__}")
    num_steps = check_positive_int(num_steps, "num_steps")
    num_key_blocks = check_positive_int(num_key_blocks, "num_key_blocks")
    last = config.last_interval
    sparse = np.zeros(num_steps, dtype=bool)
    refresh = np.zeros(num_steps, dtype=bool)
    density = np.ones(num_steps, dtype=np.float64)
    num_blocks = np.full(num_steps, num_key_blocks, dtype=np.int32)
    for step in range(config.dense_steps, num_steps):
        offset = step - config.dense_steps
        interval = offset // config.refresh_interval
        usable = last is None or interval <= last
        in_force = interval if usable else last
        sparse[step] = True
        refresh[step] = usable and offset % config.refresh_interval == 0
        density[step] = config.density - in_force * config.density_decrement
        num_blocks[step] = blocks_for_density(density[step], num_key_blocks)
    max_blocks = int(num_blocks[sparse].max()) if sparse.any() else 0
    return SchedulePlan(
        sparse=sparse,
        refresh=refresh,
        density=density,
        num_blocks=num_blocks,
        max_blocks=max_blocks,
        num_key_blocks=num_key_blocks,
    )


def reported_sparsity(
    plan: SchedulePlan,
    num_layers: int,
    dense_layers: tuple[int, ...] = (0,),
    *,
    joint: JointTokens | None = None,
    block_size: int = 128,
) -> float:
    """The paper's reported sparsity (docs/spec.md §6): mean skipped block fraction over the sparse
    steps and all self-attention layers, dense layers counting as 0. 0.0 without sparse steps.

    With ``joint`` (a joint text + video sequence, docs/spec.md §6.1) a step's kept fraction is
    :func:`~dfsattn_jax.joint.joint_density` (text blocks always on, text query rows dense), as
    the reference counts it: HunyuanVideo's default schedule at 720p×129 gives 0.8029.
    """
    num_layers = check_positive_int(num_layers, "num_layers")
    dense = {i for i in dense_layers if 0 <= i < num_layers}
    if not plan.sparse.any():
        return 0.0
    if joint is None:
        skipped = 1.0 - plan.num_blocks[plan.sparse].astype(np.float64) / plan.num_key_blocks
    else:
        if joint.num_blocks(block_size) != plan.num_key_blocks:
            raise ValueError(
                f"joint {joint} has {joint.num_blocks(block_size)} blocks of {block_size}, the plan "
                f"{plan.num_key_blocks}"
            )
        skipped = np.array([1.0 - joint_density(k, joint, block_size) for k in plan.num_blocks[plan.sparse]])
    return float(skipped.mean() * (num_layers - len(dense)) / num_layers)


def default_schedule(num_steps: int, base: DFSConfig = DFSConfig()) -> DFSConfig:
    """The default schedule for a run of ``num_steps`` steps.

    At 50 steps this is ``base`` itself (docs/spec.md §6: dense 0–11, refreshes at 12, 24, 36). For other
    step counts ``dense_steps`` and ``refresh_interval`` are scaled by ``num_steps / 50`` (rounded,
    at least 1), so that short CPU runs keep the same shape: e.g. 20 steps → dense 0–4, refreshes
    at 5, 10, 15 with densities 0.3, 0.2, 0.1.
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    if num_steps == 50:
        return base
    factor = num_steps / 50.0
    return dataclasses.replace(
        base,
        dense_steps=max(1, round(base.dense_steps * factor)),
        refresh_interval=max(1, round(base.refresh_interval * factor)),
    )


# ----------------------------------------------------------------------------------------------
# Named schedule presets. One registry, SCHEDULE_PRESETS; to ship another schedule, add an
# entry (a SchedulePreset) and it is available from get_schedule_preset, the sampler (pass its
# config as the backend's DFSConfig) and `dfsattn-generate --schedule NAME`.


@dataclasses.dataclass(frozen=True)
class SchedulePreset:
    """A named DFSAttn schedule for 50-step sampling.

    Attributes:
      name: the registry key.
      config: the schedule (its tile and block size and order are the defaults; the schedule
        fields and ``dense_layers`` are what the preset chooses).
      description: one line: what it is for and where its values come from.
    """

    name: str
    config: DFSConfig
    description: str


SCHEDULE_PRESETS: dict[str, SchedulePreset] = {
    "wan2.1": SchedulePreset(
        "wan2.1", DFSConfig(),
        "the default, the reference's Wan2.1 schedule (spec §6): dense steps 0-11, refreshes at 12, 24, 36 with "
        "densities 0.3, 0.2, 0.1, layer 0 dense",
    ),
    # All 60 joint attentions sparse: over 50 steps dense 0-11, refreshes at 12, 24, 36 (budgets
    # 279, 186, 93 of 931 joint blocks at 720p x 129), the step-36 mask kept to the end.
    "hunyuan-video": SchedulePreset(
        "hunyuan-video", DFSConfig(dense_layers=()),
        "the reference's HunyuanVideo schedule (spec §6.1): the wan2.1 steps and densities, no always-dense layer",
    ),
    # The schedule search's winner on the v2 harness model (benchmarks/NOTES.md, "Fidelity v2: DFS
    # measured", holds its measurements): dense steps 0-9, refreshes at 10 and 26 with densities
    # 0.3 and 0.15, the step-26 mask kept to the end.
    "fast": SchedulePreset(
        "fast", DFSConfig(density=0.3, density_decrement=0.15, dense_steps=10, refresh_interval=16, dense_layers=(0,)),
        "the fastest schedule found within 0.2 dB PSNR of wan2.1 (benchmarks/schedule_search.py on the v2 harness "
        "model): dense steps 0-9, refreshes at 10 and 26 with densities 0.3 and 0.15, layer 0 dense; 1.72x over "
        "dense composed on Wan2.1-1.3B (wan2.1: 1.67x)",
    ),
}  # fmt: skip


def get_schedule_preset(name: str, num_steps: int | None = None) -> DFSConfig:
    """The :class:`DFSConfig` of the preset ``name`` (:data:`SCHEDULE_PRESETS`).

    Args:
      name: a key of :data:`SCHEDULE_PRESETS`.
      num_steps: ``None`` for the preset as defined (for 50 steps); otherwise its dense steps and
        refresh interval scaled to ``num_steps`` as :func:`default_schedule` scales the default.

    Raises:
      ValueError: for an unknown name (listing the known ones).
    """
    config = lookup(SCHEDULE_PRESETS, name, "schedule preset").config
    return config if num_steps is None else default_schedule(num_steps, config)
