"""Block-sparse flash attention for Hopper (sm90a), written in Pallas Mosaic GPU.

Same contract as the Triton kernel in ``pallas_kernels/block_sparse_triton.py`` (docs/spec.md §4-§5):
for every (batch, head, query block of 128 tokens) the kernel visits the first
``kv_counts[b, n, u]`` key blocks listed in ``kv_indices[b, n, u]`` with a float32 online
softmax; the counts are read at run time, so one compiled kernel serves every density.

Layout of the work (FlashAttention-3 style, one CTA per 128-token query block):
  * grid = (B, N, nq); Mosaic GPU maps the *last* grid axis to CUDA x, so the query blocks of
    one (batch, head) run together and share that head's K/V in L2;
  * 3 warpgroups: warpgroups 0 and 1 each own 64 query rows of the block (they share the
    block's key list, hence one K/V stream), warpgroup 2 is the producer: it reads the key
    block index ``kv_indices[b, n, u, j]`` and issues the TMA copies of K and V into a
    ``num_stages``-deep shared-memory ring guarded by mbarriers (filled/consumed per slot);
  * QK^T and PV are ``wgmma`` with float32 accumulators in registers; the two compute
    warpgroups ping-pong through a schedule barrier so that one's softmax overlaps the
    other's matrix products;
  * q, k, v, out stay in the ``[B, L, N, D]`` layout of ``jax.nn.dot_product_attention``:
    TMA picks the (batch, rows, head) tile itself, so nothing is transposed in HBM. L is
    padded to a multiple of 8 only when it is not one (TMA tiling needs it);
  * TMA zero-fills rows past the end on loads and clips them on stores, so the query tail
    needs nothing; the key tail (keys ``>= L`` or ``>= kv_lengths[b]``) is masked on the last
    visited block only, which is the partial one because row entries are sorted ascending.

The Mosaic GPU *interpreter* cannot run L that is not a multiple of 8 (the internally padded
path; the compiled kernel runs it): interpretation refuses such L with ``NotImplementedError``.

Two variants of the PV product, chosen by ``MosaicTuning.p_in_registers``:
  * ``True``: P stays in registers as the wgmma A operand (the GPU path);
  * ``False``: P goes through shared memory. The Mosaic GPU interpreter
    (``plgpu.InterpretGPUParams``, CPU) cannot model register-A wgmma, so interpretation
    always takes this variant.

Measured speeds, and the reasons for the defaults, are in benchmarks/NOTES.md ("Mosaic GPU kernel").
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels.common import LOG2E, refuse_unsupported
from pallas_kernels.contract import (
    BlockLayout,
    check_block_sparse_inputs,
    kernel_rows,
)

__all__ = [
    "GRID_NAMES",
    "THREAD_NAME",
    "MosaicTuning",
    "block_sparse_attention",
    "block_sparse_attention_unchecked",
    "unsupported",
]

_BLOCK = 128  # layout block = query rows per CTA = key rows per step
_ROWS_PER_WG = 64  # query rows per compute warpgroup
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SUPPORTED_HEAD_DIMS = (64, 128)
_MIN_JAX = (0, 11, 1)
# Names of the kernel's grid axes and of its warpgroup axis. Inside ``jax.shard_map`` the mesh axis
# names are in scope too, and ``lax.axis_index(name)`` in the kernel body resolves a grid axis that
# shares a mesh axis's name to the device's mesh coordinate: with a grid axis called "heads" under
# a mesh axis "heads" (models/common/parallel.py), every CTA read the device index as its head, and
# most heads' outputs were never written (issue 15). Hence names no mesh is likely to use.
GRID_NAMES: tuple[str, str, str] = ("dfs_mosaic_batch", "dfs_mosaic_head", "dfs_mosaic_q_block")
THREAD_NAME = "dfs_mosaic_warpgroup"


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
    """Tuning of the Mosaic GPU kernel: its pipelining depth, warpgroup scheduling, register
    budgets and the variant of its PV product.

    Attributes:
      num_stages: depth of the K/V shared-memory ring (2 or 3; 3 fits at D=128:
        Q 32 KiB + 3 x 64 KiB of K/V).
      schedule_barrier: ping-pong the two compute warpgroups (FA3 intra-CTA overlap).
      compute_registers: ``setmaxnreg`` for the compute warpgroups.
      producer_registers: ``setmaxnreg`` for the TMA warpgroup.
      fold_scale: apply the logit scale inside the exponent's FMA (``exp2(s*c - m)``, with
        the row max taken on raw logits) instead of scaling every logit first; used only when
        the scale is positive.
      p_in_registers: P stays in registers as the A operand of the PV wgmma (the fast GPU
        path); ``False`` routes P through shared memory. The interpreter always takes the
        shared-memory variant.
    """

    num_stages: int = 2
    schedule_barrier: bool = True
    compute_registers: int = 232
    producer_registers: int = 40
    fold_scale: bool = True
    p_in_registers: bool = True

    def __post_init__(self):
        if self.num_stages not in (2, 3) or isinstance(self.num_stages, bool):
            raise ValueError(f"num_stages must be 2 or 3, got {self.num_stages!r}")
        for name in ("compute_registers", "producer_registers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and 24 <= value <= 256 and value % 8 == 0):
                raise ValueError(f"{name} must be a multiple of 8 in [24, 256], got {value!r}")
        for name in ("schedule_barrier", "fold_scale", "p_in_registers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _jax_version() -> tuple[int, ...]:
    parts = []
    for piece in jax.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _plgpu():
    """Imports ``jax.experimental.pallas.mosaic_gpu`` lazily (absent/older on jax < 0.11.1)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


def unsupported(q, block_size: int = 128) -> str | None:
    """Why this kernel cannot run ``q`` (``[B, L, N, D]``, checked by the contract) in
    ``block_size``-token blocks, or ``None``: the jax version, dtype, head dim and block size.

    The device (an sm90 GPU, or the interpreter) is the caller's choice.
    """
    if _jax_version() < _MIN_JAX:
        return f"jax {jax.__version__} < 0.11.1 (Mosaic GPU kernel API)"
    dtype = jnp.dtype(q.dtype)
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} not supported (bfloat16 or float16 only)"
    if q.shape[-1] not in _SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not supported (64 or 128 only)"
    if block_size != _BLOCK:
        return f"block_size {block_size} not supported (128 only)"
    return None


def _make_kernel(
    *,
    batch: int,
    seq_len: int,
    heads: int,
    head_dim: int,
    num_q_blocks: int,
    dtype,
    qk_scale_log2: float,
    fast: bool,
    config: MosaicTuning,
    interpret,
):
    """Builds the ``plgpu.kernel`` for one static configuration.

    The returned callable takes ``q, k, v [B, Lp, N, D]`` (``Lp`` a multiple of 8),
    ``kv_indices int32[B, N, nq, K_max]``, ``kv_counts int32[B, N, nq]`` (already trimmed to
    blocks holding at least one visible key) and ``kv_lengths int32[B]`` (visible keys per
    batch element, ``<= L``), and returns ``[B, Lp, N, D]``.
    """
    plgpu = _plgpu()
    import jax.experimental.pallas as pl

    stages = config.num_stages
    fold_scale = config.fold_scale and qk_scale_log2 > 0.0
    use_sched = config.schedule_barrier
    rows = _ROWS_PER_WG
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, idx_ref, cnt_ref, len_ref, o_ref, scratch):
        (qo_smem2, k_smem, v_smem, p_smem2), (k_full, v_full, q_full), (k_free, v_free), sched = scratch
        b, h, qi = (lax.axis_index(name) for name in GRID_NAMES)
        wg = lax.axis_index(THREAD_NAME)
        count = cnt_ref[b, h, qi]

        def schedule_barrier():
            if use_sched:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(config.compute_registers, action="increase")
            qo_smem = qo_smem2.at[wg]
            q_base = qi * _BLOCK + wg * rows
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, rows), h], qo_smem, q_full.at[wg])
            # Only the last visited block can hold invisible keys (sorted rows, trimmed counts):
            # `limit` is the number of visible keys in it (>= 1 when count > 0).
            last_block = idx_ref[b, h, qi, jnp.maximum(count - 1, 0)]
            limit = len_ref[b] - last_block * _BLOCK
            last_partial = limit < _BLOCK

            m_i = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout)
            l_i = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
            acc = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), wgmma_layout)
            plgpu.barrier_wait(q_full.at[wg])

            @pl.when(count > 0)
            def _():
                plgpu.barrier_wait(k_full.at[0])

            pl.when(wg == 1)(schedule_barrier)  # offsets the two warpgroups by half a step

            def step(j, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(j, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    schedule_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((rows, _BLOCK), jnp.float32))

                @pl.when(j + stages < count)  # only slots that will be refilled are released
                def _():
                    plgpu.barrier_arrive(k_free.at[slot])

                def mask_tail(s):
                    cols = plgpu.broadcasted_iota(jnp.int32, (rows, _BLOCK), 1, layout=wgmma_layout)
                    return jnp.where(cols < limit, s, -jnp.inf)

                if not fold_scale:  # scale before masking: a negative scale would flip -inf
                    s = s * qk_scale_log2
                s = lax.cond(last_partial & (j == count - 1), mask_tail, lambda s: s, s)
                # Online softmax in base 2, m kept in the scaled domain.
                if fold_scale:  # scale > 0: max commutes with it; one FFMA per logit
                    m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale_log2)
                    p = jnp.exp2(s * qk_scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                else:
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                alpha = jnp.exp2(m_i - m_new)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                if use_sched:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_full.at[slot])
                if use_sched:
                    plgpu.barrier_wait(sched)

                def wait_next_k():
                    @pl.when(j + 1 < count)
                    def _():
                        plgpu.barrier_wait(k_full.at[lax.rem(j + 1, stages)])

                if fast:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()  # overlaps the next K wait with this wgmma

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:
                    p_smem = p_smem2.at[wg]
                    p_smem[...] = p16
                    plgpu.commit_smem()

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((rows, head_dim), jnp.float32))
                    wait_next_k()

                @pl.when(j + stages < count)
                def _():
                    plgpu.barrier_arrive(v_free.at[slot])

                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, count, step, (acc, m_i, l_i))
            pl.when(wg == 0)(schedule_barrier)  # balances warpgroup 1's initial arrival
            inv_l = 1.0 / jnp.where(l_i > 0.0, l_i, 1.0)  # count == 0 -> zeros
            acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q_base, rows), h])  # clipped at Lp
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(config.producer_registers, action="decrease")

            def load(j, slot):
                rows_kv = pl.ds(idx_ref[b, h, qi, j] * _BLOCK, _BLOCK)
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows_kv, h], k_smem.at[slot], k_full.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows_kv, h], v_smem.at[slot], v_full.at[slot])

            for i in range(stages):  # fill the ring

                @pl.when(i < count)
                def _():
                    load(i, i)

            @pl.loop(stages, jnp.maximum(count, stages))
            def _(j):
                slot = lax.rem(j, stages)
                rows_kv = pl.ds(idx_ref[b, h, qi, j] * _BLOCK, _BLOCK)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows_kv, h], k_smem.at[slot], k_full.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows_kv, h], v_smem.at[slot], v_full.at[slot])

    def entry(q_ref, k_ref, v_ref, idx_ref, cnt_ref, len_ref, o_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

        def smem(shape):
            return plgpu.SMEM(shape, dtype, transforms=transforms)

        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, idx_ref, cnt_ref, len_ref, o_ref, scratch),
            (
                smem((2, rows, head_dim)),  # Q tile per warpgroup, reused for the output
                smem((stages, _BLOCK, head_dim)),
                smem((stages, _BLOCK, head_dim)),
                None if fast else smem((2, rows, _BLOCK)),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=2),
            ),
            (
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            ),
            plgpu.Barrier(num_arrivals=2),
            collective_axes=THREAD_NAME,
        )

    padded_len = seq_len + (-seq_len) % 8
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((batch, padded_len, heads, head_dim), dtype),
        grid=(batch, heads, num_q_blocks),
        grid_names=GRID_NAMES,
        num_threads=3,
        thread_name=THREAD_NAME,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name="dfs_block_sparse_attention_mosaic",
    )


def block_sparse_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int = 128,
    scale: float | None = None,
    kv_lengths: Int[Array, " b"] | None = None,
    interpret=False,
    tuning: MosaicTuning | None = None,
) -> Float[Array, "b l n d"]:
    """Block-sparse attention over the listed key blocks (docs/spec.md §5), Mosaic GPU kernel for sm90a.

    Args:
      q, k, v: ``[B, L, N, D]`` (the layout of ``jax.nn.dot_product_attention``), bfloat16 or
        float16, D in {64, 128}, any L >= 1 (the last block may be partial).
      layout: a :class:`~pallas_kernels.contract.BlockLayout` ``[B, N, nq, K_max]`` with
        ``nq = num_key_blocks = ceil(L / 128)``; the first ``kv_counts`` entries of each row are
        the key blocks to visit: distinct, in ``[0, nq)`` and sorted ascending (docs/spec.md §4;
        a concrete layout is checked here). Counts are read at run time (clipped to
        ``[0, K_max]``); a row with count 0 gives zeros; entries past the count are never read.
        A traced layout in another row order is still correct without ``kv_lengths`` (the
        partial last block is moved to the end of its row); with ``kv_lengths`` rows must be
        sorted, since the blocks past the visible length are dropped as the row's tail.
      block_size: tokens per layout block; 128 only.
      scale: logit scale, default ``1/sqrt(D)``.
      kv_lengths: optional ``int[B]``: keys at or past ``kv_lengths[b]`` are never attended
        (default L); a row with no visible key gives zeros.
      interpret: ``False`` (compile for the GPU), ``True`` or a ``plgpu.InterpretGPUParams``
        (run in the Mosaic GPU interpreter with race detection and NaN-filled buffers, as the
        tests do; always the shared-memory-P variant; L a multiple of 8).
      tuning: :class:`MosaicTuning`, default ``MosaicTuning()``.

    Returns:
      ``[B, L, N, D]`` in the input dtype; accumulation is float32.

    Raises:
      TypeError, ValueError: for inputs that break the contract (:mod:`pallas_kernels.contract`).
      NotImplementedError: for an input this kernel cannot take (:func:`unsupported` says why),
        or an L the interpreter cannot run.
    """
    check_block_sparse_inputs(q, k, v, layout, block_size=block_size, kv_lengths=kv_lengths)
    refuse_unsupported(unsupported(q, block_size), "the Mosaic GPU kernel")
    return block_sparse_attention_unchecked(
        q, k, v, layout, block_size=block_size, scale=scale, kv_lengths=kv_lengths, interpret=interpret,
        tuning=tuning,
    )  # fmt: skip


def block_sparse_attention_unchecked(
    q, k, v, layout, *, block_size=128, scale, kv_lengths, interpret=False, tuning=None
) -> Float[Array, "b l n d"]:
    """:func:`block_sparse_attention` without the contract's checks, same arguments, for a caller
    that has made them (``dfsattn_jax``'s dispatch); the tuning and the interpreter's limits are
    checked here."""
    del block_size  # 128: the kernel's only block size (the caller's unsupported() check)
    tuning = MosaicTuning() if tuning is None else tuning
    if not isinstance(tuning, MosaicTuning):
        raise TypeError(f"tuning must be a MosaicTuning, got {type(tuning).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if interpret is True:  # the configuration the test suite exercises
        interpret = _plgpu().InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
    elif interpret is False:
        interpret = None
    elif not isinstance(interpret, _plgpu().InterpretGPUParams):
        raise TypeError(f"interpret must be True, False or a plgpu.InterpretGPUParams, got {interpret!r}")
    p_in_registers = tuning.p_in_registers
    if interpret is not None:
        p_in_registers = False  # the interpreter has no register-A wgmma (run_state)
        if q.shape[1] % 8:
            # The interpreter deadlocks on the internally padded path, which the compiled kernel
            # runs correctly (benchmarks/NOTES.md, "Mosaic GPU kernel").
            raise NotImplementedError(
                f"the Mosaic GPU interpreter cannot run L={q.shape[1]} (not a multiple of 8; the compiled "
                "kernel can): pad L to a multiple of 8 or interpret the 'triton' or 'xla' implementation"
            )
    return _block_sparse_attention_mosaic(
        q, k, v, layout.kv_indices.astype(jnp.int32), layout.kv_counts.astype(jnp.int32), kv_lengths,
        scale=scale, fast=bool(p_in_registers), config=tuning, interpret=interpret,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("scale", "fast", "config", "interpret"))
def _block_sparse_attention_mosaic(q, k, v, kv_indices, kv_counts, kv_lengths, *, scale, fast, config, interpret):
    batch, seq_len, heads, head_dim = q.shape
    nq = kv_counts.shape[-1]
    # Whatever a traced layout holds, the producer never asks TMA for a block outside [0, nq);
    # the kernel masks only a row's last visited block, which kernel_rows makes the partial one.
    kv_indices, counts, lengths = kernel_rows(kv_indices, kv_counts, kv_lengths, seq_len=seq_len, block_size=_BLOCK)
    pad = (-seq_len) % 8
    if pad:  # TMA tiling needs a multiple of 8 rows; padded keys are masked, rows dropped
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    kernel = _make_kernel(
        batch=batch, seq_len=seq_len, heads=heads, head_dim=head_dim, num_q_blocks=nq,
        dtype=q.dtype, qk_scale_log2=scale * LOG2E, fast=fast, config=config, interpret=interpret,
    )
    out = kernel(q, k, v, kv_indices, counts, lengths)
    return out[:, :seq_len] if pad else out
