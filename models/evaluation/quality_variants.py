"""The variants of the quality harness: what each run samples differently from the dense reference.

A :class:`Variant` names one way of sampling (token order, layout source, scoring tile, density or
the default schedule, mask caching); :func:`default_variants` lists the quality benchmark's
variants (docs/spec.md §9), dense reference first; :func:`variant_plan` turns a variant into its
step plan and :func:`window_step_scores` gives the static-window baseline its per-step block
scores. :class:`~models.evaluation.quality.QualityRunner` runs them all in one compiled program.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Sequence

import numpy as np
from jaxtyping import Float, Int

from dfsattn_jax.baselines import static_window_scores
from dfsattn_jax.checks import check_density
from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule

__all__ = [
    "SCORINGS",
    "SCORING_ORACLE",
    "SCORING_RANDOM",
    "SCORING_WINDOW",
    "VARIANT_GROUPS",
    "Variant",
    "default_variants",
    "fixed_density",
    "refresh_every_step",
    "select_variants",
    "variant_plan",
    "window_step_scores",
]

#: ``Variant.scoring`` value of the static spatio-temporal window baseline.
SCORING_WINDOW = "window"
#: ``Variant.scoring`` value of the random-layout baseline (uniform random scores, top-k).
SCORING_RANDOM = "random"
#: ``Variant.scoring`` value of the oracle layout (top-k of the exact dense block mass).
SCORING_ORACLE = "oracle"
#: Every ``Variant.scoring`` value.
SCORINGS = ("dfs", SCORING_WINDOW, SCORING_RANDOM, SCORING_ORACLE)
#: Every ``Variant.group`` of :func:`default_variants`.
VARIANT_GROUPS = ("dense", "order", "tile", "window", "random", "oracle", "refresh")


def fixed_density(config: DFSConfig, density: float) -> DFSConfig:
    """``config`` at a fixed ``density``: no decrement (a refresh every ``refresh_interval`` steps
    after the dense steps, always at ``density``)."""
    return dataclasses.replace(config, density=check_density(density), density_decrement=0.0)


def refresh_every_step(plan: SchedulePlan) -> SchedulePlan:
    """The same densities as ``plan``, with the mask recomputed at every sparse step."""
    return dataclasses.replace(plan, refresh=plan.sparse.copy())


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of sampling, compared against the dense run.

    Attributes:
      name: unique label.
      group: ``"dense"``, ``"order"``, ``"tile"``, ``"window"``, ``"random"``, ``"oracle"`` or
        ``"refresh"`` (for tables).
      sparse: ``False`` for the dense reference (every other field is then ignored).
      order: token order (:data:`~dfsattn_jax.orders.ORDER_NAMES`).
      scoring: ``"dfs"`` (hierarchical scoring), :data:`SCORING_WINDOW` (static window),
        :data:`SCORING_RANDOM` (a random layout with the same count) or :data:`SCORING_ORACLE`
        (top-k of the exact dense block mass).
      tile_size: DFS scoring tile (``None``: the runner's default tile).
      density: a fixed density (no decrement); ``None``: the default schedule.
      refresh: ``"schedule"`` (cache between refreshes) or ``"every"`` (refresh at every sparse step).
    """

    name: str
    group: str
    sparse: bool = True
    order: str = "hilbert3d"
    scoring: str = "dfs"
    tile_size: int | None = None
    density: float | None = None
    refresh: str = "schedule"

    def __post_init__(self) -> None:
        if self.order not in ORDER_NAMES:
            raise ValueError(f"order must be one of {ORDER_NAMES}, got {self.order!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.refresh not in ("schedule", "every"):
            raise ValueError(f"refresh must be 'schedule' or 'every', got {self.refresh!r}")
        if self.density is not None:
            object.__setattr__(self, "density", check_density(self.density))

    @property
    def schedule_label(self) -> str:
        return "default" if self.density is None else f"{self.density:g}"


def variant_plan(variant: Variant, num_steps: int, num_key_blocks: int, base: DFSConfig) -> SchedulePlan | None:
    """The step plan of ``variant`` (``None`` for dense): ``base`` (already scaled to
    ``num_steps``, see :func:`~dfsattn_jax.schedule.default_schedule`), at a fixed density if given, refreshed at every
    sparse step if asked."""
    if not variant.sparse:
        return None
    config = base if variant.density is None else fixed_density(base, variant.density)
    plan = plan_schedule(config, num_steps, num_key_blocks)
    return refresh_every_step(plan) if variant.refresh == "every" else plan


def window_step_scores(
    grid: tuple[int, int, int],
    perm: Int[np.ndarray, " L"],
    plan: SchedulePlan,
    capacity: int,
    *,
    block_size: int,
    cache: dict | None = None,
) -> Float[np.ndarray, "p nq nk"]:
    """Static-window block scores for every step of ``plan``: ``float32[capacity, nq, nk]``.

    Step ``s`` holds :func:`~dfsattn_jax.baselines.static_window_scores` at the density in force
    (only refresh steps read them); other steps hold zeros. ``cache`` (a dict the caller owns)
    memoises the scores per ``(perm bytes, density)``.
    """
    nk = plan.num_key_blocks
    out = np.zeros((capacity, nk, nk), np.float32)
    for step in np.flatnonzero(plan.sparse):
        density = float(plan.density[step])
        key = (np.asarray(perm).tobytes(), block_size, density)
        if cache is None or key not in cache:
            scores = np.asarray(static_window_scores(grid, perm, block_size=block_size, density=density))
            if cache is not None:
                cache[key] = scores
        else:
            scores = cache[key]
        out[step] = scores
    return out


def default_variants(
    *,
    orders: Sequence[str] = ("raster", "hilbert2d", "block3d", "morton3d", "hilbert3d"),
    densities: Sequence[float] = (0.3, 0.2, 0.1, 0.05),
    tile_size: int = 16,
    block_size: int = 128,
    other_tiles: Sequence[int] = (8, 32),
    tile_densities: Sequence[float | None] = (None, 0.1),
    window_orders: Sequence[str] = ("hilbert3d",),
    random_orders: Sequence[str] = ("hilbert3d",),
    oracle_orders: Sequence[str] = ("hilbert3d",),
    oracle_densities: Sequence[float | None] = (0.2, None),
    refresh_densities: Sequence[float | None] = (None,),
) -> tuple[Variant, ...]:
    """The variants of the quality benchmark, dense reference first.

    * ``order``: every order × (each fixed density, the default schedule), DFS scoring;
    * ``tile``: hilbert3d with tile = block (plain block mean pooling) and each of ``other_tiles``
      at each of ``tile_densities`` (``None``: default schedule); tile ``tile_size`` is in ``order``;
    * ``window``: the static window in each of ``window_orders`` at each density and with the
      default schedule's densities;
    * ``random``: a uniformly random layout (per batch, head, query block, layer and refresh)
      with the same count, in each of ``random_orders``, at each density and the default schedule;
    * ``oracle``: top-k of the exact dense block mass (the recall-optimal layout of the same
      count) in each of ``oracle_orders`` at each of ``oracle_densities`` (``None``: default
      schedule), cached like DFS: the gap to DFS is what the scoring's estimate costs;
    * ``refresh``: hilbert3d refreshed at every sparse step at each of ``refresh_densities``
      (compare with the cached ``order`` rows of the same densities).
    """
    out = [Variant("dense", "dense", sparse=False, order="raster")]
    schedules: list[float | None] = [*densities, None]
    label = lambda d: "default" if d is None else f"d={d:g}"  # noqa: E731
    for order in orders:
        for d in schedules:
            out.append(Variant(f"{order}/{label(d)}", "order", order=order, density=d))
    tiles = [block_size] + [t for t in other_tiles if t not in (tile_size, block_size)]
    for tile in tiles:
        for d in tile_densities:
            out.append(Variant(f"hilbert3d/tile{tile}/{label(d)}", "tile", order="hilbert3d", tile_size=tile, density=d))
    for order in window_orders:
        for d in schedules:
            out.append(Variant(f"window-{order}/{label(d)}", "window", order=order, scoring=SCORING_WINDOW, density=d))
    for order in random_orders:
        for d in schedules:
            out.append(Variant(f"random-{order}/{label(d)}", "random", order=order, scoring=SCORING_RANDOM, density=d))
    for order in oracle_orders:
        for d in oracle_densities:
            out.append(Variant(f"oracle-{order}/{label(d)}", "oracle", order=order, scoring=SCORING_ORACLE, density=d))
    for d in refresh_densities:
        out.append(Variant(f"hilbert3d/{label(d)}/refresh-every-step", "refresh", order="hilbert3d", density=d, refresh="every"))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    return tuple(out)


def select_variants(variants: Sequence[Variant], patterns: str | None) -> list[Variant]:
    """The variants named by ``patterns``, in their order in ``variants``; the dense reference is
    always selected.

    Args:
      variants: the candidates (:func:`default_variants`).
      patterns: comma-separated variant names, shell patterns (``"raster/*"``) or
        ``"group:NAME"`` (:data:`VARIANT_GROUPS`); ``None`` selects every variant.

    Raises:
      ValueError: for a pattern that matches no variant.
    """
    if patterns is None:
        return list(variants)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]

    def hit(v: Variant, pattern: str) -> bool:
        return v.group == pattern[6:] if pattern.startswith("group:") else fnmatch.fnmatchcase(v.name, pattern)

    unmatched = [p for p in wanted if not any(hit(v, p) for v in variants)]
    if unmatched:
        raise ValueError(f"variant patterns {unmatched} match no variant (names like 'hilbert3d/d=0.2'; groups {VARIANT_GROUPS})")
    return [v for v in variants if v.name == "dense" or any(hit(v, p) for p in wanted)]
