"""The one static dispatch: which implementation runs a block-sparse attention or a block scoring,
and why.

Two kinds, one record type (:class:`Implementation`) and one rule (:func:`resolve`):

``"attention"`` (:data:`ATTENTION`)
  ``"mosaic_gpu"``: the Pallas Mosaic GPU kernel (:mod:`pallas_kernels.block_sparse_mosaic`),
  Hopper (sm90) GPUs; ``"triton"``: the Pallas Triton kernel
  (:mod:`pallas_kernels.block_sparse_triton`), any NVIDIA GPU; ``"xla"``: the float32 XLA
  oracle (:mod:`dfsattn_jax.reference`), any backend (the CPU path and the test oracle).
``"scoring"`` (:data:`SCORING`)
  ``"triton"``: the fused Pallas Triton scorer (:mod:`pallas_kernels.block_scores_triton`), any
  NVIDIA GPU; ``"jnp"``: the float32 jnp scorer (:mod:`dfsattn_jax.tiles`), any backend.

With ``implementation=None`` the first implementation of the kind's order that runs on this
device and takes the input wins: on a GPU the kernels in order of speed, falling back with the
reason when one cannot take the input (a head dim, a dtype, a block size); off GPU the reference.
A name asked for runs whatever the device (a Pallas kernel with ``interpret=True`` runs anywhere).
Every function here is called after the public entry point's checks, so none of them checks q.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
from jaxtyping import Array

from dfsattn_jax import reference, tiles
from pallas_kernels import block_scores_triton, block_sparse_mosaic, block_sparse_triton

__all__ = [
    "ATTENTION",
    "KINDS",
    "SCORING",
    "Implementation",
    "Resolution",
    "check_implementation",
    "gpu_compute_capability",
    "on_gpu",
    "resolve",
]

Kind = Literal["attention", "scoring"]


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def gpu_compute_capability() -> str | None:
    """The default GPU's compute capability (``"9.0"`` for Hopper), or ``None`` off GPU."""
    if not on_gpu():
        return None
    return getattr(jax.devices()[0], "compute_capability", None)


def _any_gpu() -> str | None:
    return None if on_gpu() else "not on a GPU"


def _hopper() -> str | None:
    capability = gpu_compute_capability()
    if capability is None:
        return "not on a GPU"
    return None if capability == "9.0" else f"compute capability {capability}, not Hopper (9.0)"


def _anywhere() -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of a kind.

    Attributes:
      name: the registry key (what ``implementation=`` names).
      description: one line for errors and docs.
      run: the unchecked function the kind's public entry point calls once its checks passed.
        Attention: ``(q, k, v, layout, *, block_size, scale, kv_lengths[, interpret])``;
        scoring: ``(q, k, kv_lengths, *, tile_size, block_size, ...)`` with ``precision`` and
        ``interpret`` for a Pallas scorer, ``chunk`` for the jnp one
        (:func:`dfsattn_jax.scoring.block_scores`).
      unsupported: ``(q, block_size, tile_size) -> str | None``: why it cannot take ``q`` (the
        kernel's own limits), ``None`` if it can.
      available: ``() -> str | None``: why it cannot be this device's default, ``None`` if it can.
      pallas: a Pallas kernel (takes ``interpret``).
    """

    name: str
    description: str
    run: Callable[..., Array]
    unsupported: Callable[[Array, int, int], str | None]
    available: Callable[[], str | None]
    pallas: bool


def _takes_all(q: Array, block_size: int, tile_size: int) -> None:
    return None


#: Block-sparse attention, in the order the default tries them.
ATTENTION: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "mosaic_gpu", "Pallas Mosaic GPU kernel (Hopper, sm90)",
            block_sparse_mosaic.block_sparse_attention_unchecked,
            lambda q, block_size, tile_size: block_sparse_mosaic.unsupported(q, block_size),
            _hopper, pallas=True,
        ),
        Implementation(
            "triton", "Pallas Triton kernel (NVIDIA GPUs)",
            block_sparse_triton.block_sparse_attention_unchecked,
            lambda q, block_size, tile_size: block_sparse_triton.unsupported(q, block_size),
            _any_gpu, pallas=True,
        ),
        Implementation(
            "xla", "XLA reference (dense attention with a token mask; any backend)",
            reference.masked_attention, _takes_all, _anywhere, pallas=False,
        ),
    )
}  # fmt: skip

#: Block scoring, in the order the default tries them.
SCORING: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "triton", "fused Pallas Triton kernel (NVIDIA GPUs)",
            tiles.kernel_block_scores,
            lambda q, block_size, tile_size: block_scores_triton.unsupported(q, block_size, tile_size=tile_size),
            _any_gpu, pallas=True,
        ),
        Implementation(
            "jnp", "float32 jnp scorer (any backend; the reference)",
            tiles.jnp_block_scores, _takes_all, _anywhere, pallas=False,
        ),
    )
}  # fmt: skip

KINDS: dict[str, dict[str, Implementation]] = {"attention": ATTENTION, "scoring": SCORING}

class Resolution(NamedTuple):
    """What :func:`resolve` chose: the implementation's name and why."""

    name: str
    reason: str


def check_implementation(kind: Kind, name: str | None, argument: str = "implementation") -> str | None:
    """``name`` after checking it names an implementation of ``kind`` (``None`` passes: the
    default).

    Raises:
      ValueError: naming ``argument`` and listing the names of the kind.
    """
    registry = _registry(kind)
    if name is not None and (not isinstance(name, str) or name not in registry):
        raise ValueError(f"{argument} must be one of {tuple(registry)} or None, got {name!r}")
    return name


def _registry(kind: str) -> dict[str, Implementation]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return KINDS[kind]


def resolve(
    kind: Kind, q: Array, implementation: str | None = None, *, block_size: int = 128, tile_size: int = 16
) -> Resolution:
    """The implementation of ``kind`` that runs ``q`` (``[B, L, N, D]``, already checked), and why.

    Args:
      kind: ``"attention"`` or ``"scoring"``.
      q: the queries (shape and dtype are read).
      implementation: a name of the kind, or ``None`` for this device's default.
      block_size, tile_size: the call's sizes (some kernels take only some).

    Returns:
      ``Resolution(name, reason)``: the name asked for ("asked for"), or the first of the kind's
      order that is available here and takes ``q`` ("default on Hopper GPUs", "default on GPUs",
      "default off GPU"), with the reasons of the ones passed over.

    Raises:
      ValueError: for an unknown kind or name.
      NotImplementedError: if the implementation asked for cannot take ``q`` (its reason).
    """
    registry = _registry(kind)
    if implementation is not None:
        check_implementation(kind, implementation)
        why = registry[implementation].unsupported(q, block_size, tile_size)
        if why is not None:
            raise NotImplementedError(f"{kind} implementation {implementation!r} cannot take this input: {why}")
        return Resolution(implementation, "asked for")
    passed_over = []
    for impl in registry.values():
        if impl.available() is not None:
            continue
        why = impl.unsupported(q, block_size, tile_size)
        if why is not None:
            passed_over.append(f"{impl.name} does not support this input ({why})")
            continue
        if passed_over:
            return Resolution(impl.name, "; ".join(passed_over))
        if not impl.pallas:
            return Resolution(impl.name, "default off GPU")
        return Resolution(impl.name, "default on Hopper GPUs" if impl.name == "mosaic_gpu" else "default on GPUs")
    raise AssertionError(f"no {kind} implementation runs here")  # the reference is always available
