"""Fused hierarchical block scoring for GPUs, written in Pallas (Triton backend).

Computes docs/spec.md §3.3–3.4 from the tile means of §3.2: for every (batch, head) the per-row
softmax of the tile logits ``q̄_i · k̄_j / sqrt(D)`` over the valid key tiles, summed over the
``tpb × tpb`` tile pairs of each (query block, key block), **without writing the ``[T, T]`` tile
matrix anywhere**: only the ``[nq, nk]`` block scores reach HBM.

Layout of the work (one program = ``block_q`` query tiles of one (batch, head)):

  * pass 1 streams the key tiles in chunks of ``block_k`` and keeps each row's running max and
    sum of exponentials (an online softmax, base 2);
  * pass 2 streams them again, recomputes the logits, ``e = exp2(l - m)``, sums each row over
    the ``tpb`` key tiles of every key block with one small matmul against a 0/1 indicator
    (``e`` split into two bfloat16 parts, so the sum keeps ~16 bits), scales each row by its
    ``1 / Z``, sums groups of ``tpb`` rows (a reshape-sum, or a second indicator matmul) and
    stores the ``[block_q / tpb, block_k / tpb]`` tile of block scores;
  * key chunks wholly past the valid key tiles are not computed, their scores are stored as 0;
    only the chunk holding the last valid key tile is masked; query rows past ``T`` (padding
    up to whole programs) get weight 0.

The logits' precision is a choice (``precision``): ``"bf16"`` (tile means rounded to bfloat16,
one tensor-core matmul), ``"bf16x3"`` (each mean split into two bfloat16 parts, three matmuls,
~16 significant bits), ``"tf32"`` (means rounded to TF32, one TF32 matmul) or ``"float32"``
(full float32 FMA: exact, slow; for tests). The rounding is done on the inputs, before the
kernel, so the interpreter reproduces what the GPU computes. The scale ``log2(e) / sqrt(D)`` is
folded into ``q̄`` before rounding. Everything after the logits is float32.

The tile means themselves are computed by the caller (``dfsattn_jax.scoring``), which reads q
and k once; this module imports nothing from the method.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.common import LOG2E, check_interpret, is_power_of_two, refuse_unsupported
from pallas_kernels.contract import check_positive_int

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "ScoreTuning",
    "block_scores_kernel",
    "tile_block_scores",
    "tile_block_scores_unchecked",
    "unsupported",
]

#: Logit precisions, cheapest first; see the module docstring.
PRECISIONS = ("bf16", "bf16x3", "tf32", "float32")
#: The default, chosen from the top-k agreement measured against the float32 jnp scorer
#: (benchmarks/NOTES.md, "Fused scorer").
DEFAULT_PRECISION = "bf16"

_ROW_SUMS = ("reshape", "dot")


@dataclasses.dataclass(frozen=True)
class ScoreTuning:
    """Tuning of the scoring kernel: its tiling (in tiles), warps, pipelining depth and how it
    sums rows.

    Attributes:
      block_q: query tiles per program (a power of two, a multiple of tiles-per-block).
      block_k: key tiles per step (a power of two with ``block_k / tiles_per_block >= 16``).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the key loops.
      row_sum: how each group of tiles-per-block query rows is summed: ``"reshape"`` (a
        reshape and a reduction) or ``"dot"`` (a 0/1 indicator matmul; needs
        ``block_q / tiles_per_block >= 16``).
    """

    block_q: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 2
    row_sum: str = "reshape"

    @classmethod
    def for_tiles_per_block(cls, tiles_per_block: int) -> "ScoreTuning":
        """The default tiling, widened where ``tiles_per_block`` needs bigger chunks."""
        return cls(block_q=max(cls.block_q, tiles_per_block), block_k=max(cls.block_k, 16 * tiles_per_block))

    def check(self, tiles_per_block: int) -> None:
        """Raises ``ValueError`` naming the field that cannot serve ``tiles_per_block``."""
        if not (is_power_of_two(self.block_q) and self.block_q >= 16 and self.block_q % tiles_per_block == 0):
            raise ValueError(
                f"tuning.block_q must be a power of two >= 16 and a multiple of tiles per block "
                f"({tiles_per_block}), got {self.block_q}"
            )
        if not (is_power_of_two(self.block_k) and self.block_k // tiles_per_block >= 16):
            raise ValueError(
                f"tuning.block_k must be a power of two >= 16 * tiles per block "
                f"({16 * tiles_per_block}), got {self.block_k}"
            )
        if self.row_sum not in _ROW_SUMS:
            raise ValueError(f"tuning.row_sum must be one of {_ROW_SUMS}, got {self.row_sum!r}")
        if self.row_sum == "dot" and self.block_q // tiles_per_block < 16:
            raise ValueError(
                f"tuning.row_sum='dot' needs block_q >= 16 * tiles per block ({16 * tiles_per_block}), "
                f"got {self.block_q}"
            )
        for name in ("num_warps", "num_stages"):
            check_positive_int(getattr(self, name), f"tuning.{name}")


def unsupported(q, block_size: int = 128, *, tile_size: int = 16) -> str | None:
    """Why this kernel cannot score ``q`` (``[B, L, N, D]``, checked by the caller) with these
    sizes, or ``None``: the head dim (a power of two in [16, 256]) and tiles per block (a power
    of two); the sizes themselves are validated by the caller.
    """
    if not (is_power_of_two(q.shape[-1]) and 16 <= q.shape[-1] <= 256):
        return f"head dim {q.shape[-1]} not supported (a power of two in [16, 256])"
    if block_size % tile_size or not is_power_of_two(block_size // tile_size):
        return f"tiles per block {block_size / tile_size:g} not supported (a power of two)"
    return None


def _split_bf16(x: Float[Array, "..."]) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """``x`` (float32) as bfloat16 ``(hi, lo)`` with ``hi + lo == x`` to ~16 significant bits.

    ``hi`` keeps the top 16 bits of ``x`` (its sign, exponent and 7 mantissa bits: exactly a
    bfloat16), so ``x - hi`` is exact and only ``lo`` is rounded. Masking bits instead of
    rounding twice keeps the kernel off the slow one-value-at-a-time conversions.
    """
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-65536), jnp.float32)
    return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


def _round_to_tf32(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """Rounds float32 to the 10 explicit mantissa bits of TF32 (to nearest, ties to even)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))
    return lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def _operands(qbar, kbar, precision: str):
    """The kernel's q and k operands for ``precision``, the (q part, k part) pairs whose
    products sum to the logits, and the precision of those matmuls."""
    if precision == "bf16":
        return [qbar.astype(jnp.bfloat16)], [kbar.astype(jnp.bfloat16)], ((0, 0),), None
    if precision == "bf16x3":
        # (qh + ql)(kh + kl) without the ql·kl term (~2^-16 relative, like the dropped rounding).
        return list(_split_bf16(qbar)), list(_split_bf16(kbar)), ((1, 0), (0, 1), (0, 0)), None
    if precision == "tf32":
        return [_round_to_tf32(qbar)], [_round_to_tf32(kbar)], ((0, 0),), lax.Precision.DEFAULT
    return [qbar], [kbar], ((0, 0),), lax.Precision.HIGHEST


def block_scores_kernel(
    *refs,
    num_q_parts: int,
    pairs: tuple[tuple[int, int], ...],
    logit_precision,
    exact_sums: bool,
    num_tiles: int,
    tiles_per_block: int,
    block_q: int,
    block_k: int,
    row_sum: str,
):
    """One program: ``block_q`` query tile rows of one (batch, head) against every key tile.

    Refs: the q parts (each ``[Tq, D]``), the k parts (each ``[Tk, D]``), ``counts`` (int32[4]:
    full key chunks, key chunks holding a valid tile, valid key tiles, unused), an aliased
    output buffer when the caller passes one (ignored), and the output ``[Tq/tpb, Tk/tpb]``.
    """
    q_refs = refs[:num_q_parts]
    num_k_parts = 1 + max(b for _, b in pairs)
    k_refs = refs[num_q_parts : num_q_parts + num_k_parts]
    cnt_ref = refs[num_q_parts + num_k_parts]
    o_ref = refs[-1]
    tpb = tiles_per_block
    q_blocks = block_q // tpb
    k_blocks = block_k // tpb

    tile = pl.program_id(0)
    q_start = tile * block_q
    qs = [r[pl.ds(q_start, block_q), :] for r in q_refs]
    full_chunks = cnt_ref[0]
    valid_chunks = cnt_ref[1]
    valid_tiles = cnt_ref[2]
    num_chunks = k_refs[0].shape[0] // block_k

    def logits(c, masked: bool):
        k_slice = pl.ds(c * block_k, block_k)
        ks = [r[k_slice, :] for r in k_refs]
        s = None
        for a, b in pairs:
            d = jnp.dot(qs[a], ks[b].T, preferred_element_type=jnp.float32, precision=logit_precision)
            s = d if s is None else s + d
        if masked:
            cols = c * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            s = jnp.where(cols < valid_tiles, s, -jnp.inf)
        return s

    # Pass 1: the running max m and sum l of exp2(logits - m) of each row over the valid keys.
    def stats_step(masked: bool):
        def step(c, carry):
            m_prev, l_prev = carry
            s = logits(c, masked)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
            # Every visited chunk holds a valid key: m_next is finite, exp2(-inf - m_next) = 0.
            l_next = l_prev * jnp.exp2(m_prev - m_next) + jnp.sum(jnp.exp2(s - m_next[:, None]), axis=1)
            return m_next, l_next

        return step

    carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, full_chunks, stats_step(False), carry)
    m, l = lax.fori_loop(full_chunks, valid_chunks, stats_step(True), carry)
    rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    weight = jnp.where((rows < num_tiles) & (l > 0.0), 1.0 / jnp.where(l > 0.0, l, 1.0), 0.0)

    # 0/1 indicators: key tile -> key block of the chunk, query block of the program <- row.
    key_ind = _indicator(block_k, k_blocks, tpb, transpose=False)
    row_ind = _indicator(block_q, q_blocks, tpb, transpose=True) if row_sum == "dot" else None
    out_rows = pl.ds(tile * q_blocks, q_blocks)

    def summed(x, ind, *, ind_left: bool):
        """``x @ ind`` (``ind @ x`` when ``ind_left``) of a float32 ``x`` and a 0/1 ``ind``,
        exact to float32 (``exact_sums``) or to ~16 bits (``x`` split into two bfloat16 parts)."""

        def dot(a, b, precision=None):
            return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

        if exact_sums:
            ind32 = ind.astype(jnp.float32)
            return dot(ind32, x, lax.Precision.HIGHEST) if ind_left else dot(x, ind32, lax.Precision.HIGHEST)
        hi, lo = _split_bf16(x)
        if ind_left:
            return dot(ind, hi) + dot(ind, lo)
        return dot(hi, ind) + dot(lo, ind)

    # Pass 2: block sums of exp2(logits - m) / l, one [q_blocks, k_blocks] tile per chunk.
    def scores_step(masked: bool):
        def step(c, carry):
            e = jnp.exp2(logits(c, masked) - m[:, None])  # [block_q, block_k], in [0, 1]
            per_row = summed(e, key_ind, ind_left=False) * weight[:, None]  # [block_q, k_blocks]
            if row_sum == "dot":
                scores = summed(per_row, row_ind, ind_left=True)
            else:
                scores = jnp.sum(per_row.reshape(q_blocks, tpb, k_blocks), axis=1)
            o_ref[out_rows, pl.ds(c * k_blocks, k_blocks)] = scores
            return carry

        return step

    def zero_step(c, carry):
        o_ref[out_rows, pl.ds(c * k_blocks, k_blocks)] = jnp.zeros((q_blocks, k_blocks), jnp.float32)
        return carry

    done = lax.fori_loop(0, full_chunks, scores_step(False), 0)
    done = lax.fori_loop(full_chunks, valid_chunks, scores_step(True), done)
    lax.fori_loop(valid_chunks, num_chunks, zero_step, done)


def _indicator(size: int, groups: int, group: int, *, transpose: bool):
    """bfloat16 0/1 matrix ``[size, groups]`` (``[groups, size]`` transposed) with a 1 where
    ``row // group == column``, built from iotas (no integer division in the kernel)."""
    shape = (groups, size) if transpose else (size, groups)
    r = lax.broadcasted_iota(jnp.int32, shape, 1 if transpose else 0)
    c = lax.broadcasted_iota(jnp.int32, shape, 0 if transpose else 1)
    inside = (r >= c * group) & (r < c * group + group)
    return jnp.where(inside, jnp.float32(1.0), jnp.float32(0.0)).astype(jnp.bfloat16)


def tile_block_scores(
    qbar: Float[Array, "b n t d"],
    kbar: Float[Array, "b n t d"],
    valid_key_tiles: Int[Array, " b"],
    *,
    tiles_per_block: int,
    precision: str | None = None,
    interpret: bool = False,
    tuning: ScoreTuning | None = None,
    poison_output: bool = False,
) -> Float[Array, "b n nq nk"]:
    """Block scores from tile means (docs/spec.md §3.3–3.4), ``float32[B, N, nq, nk]``.

    Args:
      qbar, kbar: float32 tile means ``[B, N, T, D]`` (docs/spec.md §3.2), D a power of two in
        [16, 256]. Key tiles at or past ``valid_key_tiles[b]`` must be zero or finite (they are
        masked, never read as keys).
      valid_key_tiles: ``int32[B]``: key tiles ``j < valid_key_tiles[b]`` take part in the
        softmax (docs/spec.md §3.6); read at run time and clipped to ``[0, T]``. A sample
        with 0 gets all-zero scores.
      tiles_per_block: tiles per block ``tpb`` (a power of two); ``nq = nk = ceil(T / tpb)``.
      precision: one of :data:`PRECISIONS` (default :data:`DEFAULT_PRECISION`).
      interpret: run in the Pallas interpreter (any backend; slow, for tests).
      tuning: :class:`ScoreTuning` (default :meth:`ScoreTuning.for_tiles_per_block`).
      poison_output: for tests: start from an all-NaN output buffer, so that any element the
        kernel fails to write shows.

    Returns:
      ``S[b, n, u, v]``: the sum over the query tiles ``i`` of block ``u`` and the key tiles
      ``j`` of block ``v`` of ``softmax_j(q̄_i · k̄_j / sqrt(D))``.

    Raises:
      TypeError: for non-arrays or a non-integer ``valid_key_tiles``.
      ValueError: for mismatched shapes, a bad ``precision`` or tuning.
      NotImplementedError: for a head dim or ``tiles_per_block`` the kernel cannot take.
    """
    for name, x in (("qbar", qbar), ("kbar", kbar), ("valid_key_tiles", valid_key_tiles)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if qbar.ndim != 4 or kbar.shape != qbar.shape:
        raise ValueError(f"qbar and kbar must have one shape [B, N, T, D], got {qbar.shape} and {kbar.shape}")
    batch, _, _, head_dim = qbar.shape
    if not (is_power_of_two(head_dim) and 16 <= head_dim <= 256):
        refuse_unsupported(f"head dim {head_dim} (a power of two in [16, 256])", "the Pallas Triton scorer")
    if not is_power_of_two(tiles_per_block):
        refuse_unsupported(f"tiles_per_block {tiles_per_block!r} (a power of two)", "the Pallas Triton scorer")
    if not jnp.issubdtype(valid_key_tiles.dtype, jnp.integer):
        raise TypeError(f"valid_key_tiles must be an integer array, got dtype {valid_key_tiles.dtype}")
    if tuple(valid_key_tiles.shape) != (batch,):
        raise ValueError(f"valid_key_tiles must have shape [B={batch}], got {tuple(valid_key_tiles.shape)}")
    return tile_block_scores_unchecked(
        qbar, kbar, valid_key_tiles, tiles_per_block=tiles_per_block, precision=precision,
        interpret=interpret, tuning=tuning, poison_output=poison_output,
    )  # fmt: skip


def tile_block_scores_unchecked(
    qbar, kbar, valid_key_tiles, *, tiles_per_block, precision=None, interpret=False, tuning=None, poison_output=False
) -> Float[Array, "b n nq nk"]:
    """:func:`tile_block_scores` without its input checks, same arguments, for a caller that has
    made them (``dfsattn_jax.tiles``); the precision and the tuning are checked here."""
    precision = DEFAULT_PRECISION if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    tuning = ScoreTuning.for_tiles_per_block(tiles_per_block) if tuning is None else tuning
    tuning.check(tiles_per_block)
    return _tile_block_scores(
        qbar, kbar, jnp.asarray(valid_key_tiles).astype(jnp.int32),
        tiles_per_block=tiles_per_block, precision=precision, tuning=tuning,
        interpret=check_interpret(interpret), poison_output=bool(poison_output),
    )  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("tiles_per_block", "precision", "tuning", "interpret", "poison_output")
)
def _tile_block_scores(qbar, kbar, valid_key_tiles, *, tiles_per_block, precision, tuning, interpret, poison_output):
    batch, heads, num_tiles, head_dim = qbar.shape
    block_q, block_k = tuning.block_q, tuning.block_k
    tq = -(-num_tiles // block_q) * block_q
    tk = -(-num_tiles // block_k) * block_k
    num_blocks = -(-num_tiles // tiles_per_block)
    # Logits in the base-2 domain: q̄ carries log2(e) / sqrt(D) (before any rounding).
    qbar = qbar.astype(jnp.float32) * (LOG2E / math.sqrt(head_dim))
    qbar = jnp.pad(qbar, ((0, 0), (0, 0), (0, tq - num_tiles), (0, 0)))
    kbar = jnp.pad(kbar.astype(jnp.float32), ((0, 0), (0, 0), (0, tk - num_tiles), (0, 0)))
    q_parts, k_parts, pairs, logit_precision = _operands(qbar, kbar, precision)

    valid = jnp.clip(valid_key_tiles, 0, num_tiles)
    counts = jnp.stack(
        [valid // block_k, -(-valid // block_k), valid, jnp.zeros_like(valid)], axis=1
    ).astype(jnp.int32)  # [B, 4]: full chunks, chunks with a valid tile, valid tiles

    out_shape = (batch, heads, tq // tiles_per_block, tk // tiles_per_block)
    q_spec = pl.BlockSpec((None, None, tq, head_dim), lambda t, b, n: (b, n, 0, 0))
    k_spec = pl.BlockSpec((None, None, tk, head_dim), lambda t, b, n: (b, n, 0, 0))
    out_spec = pl.BlockSpec((None, None) + out_shape[2:], lambda t, b, n: (b, n, 0, 0))
    operands = [*q_parts, *k_parts, counts]
    in_specs = [q_spec] * len(q_parts) + [k_spec] * len(k_parts) + [pl.BlockSpec((None, 4), lambda t, b, n: (b, 0))]
    aliases = {}
    if poison_output:
        operands.append(jnp.full(out_shape, jnp.nan, jnp.float32))
        in_specs.append(out_spec)
        aliases = {len(operands) - 1: 0}
    kernel = functools.partial(
        block_scores_kernel,
        num_q_parts=len(q_parts),
        pairs=pairs,
        logit_precision=logit_precision,
        exact_sums=precision == "float32",
        num_tiles=num_tiles,
        tiles_per_block=tiles_per_block,
        block_q=block_q,
        block_k=block_k,
        row_sum=tuning.row_sum,
    )
    scores = pl.pallas_call(
        kernel,
        grid=(tq // block_q, batch, heads),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        input_output_aliases=aliases,
        interpret=interpret,
        name="dfs_block_scores",
    )(*operands)
    return scores[:, :, :num_blocks, :num_blocks]
