"""Block-sparse flash attention for GPUs, written in Pallas (Triton backend).

The kernel computes docs/spec.md §5: for every (batch, head, query block) it visits only the first
``kv_counts[b, n, u]`` key blocks listed in ``kv_indices[b, n, u]`` with a float32 online
softmax, so its cost is linear in the number of visited blocks and one compiled kernel
serves every density (the counts are read at run time).

Layout of the work:
  * grid = (query tiles, batch, heads); the query tile is the fastest axis, so all programs
    of one (batch, head) run together and share K/V in L2;
  * q, k, v, out stay in the ``[B, L, N, D]`` layout of ``jax.nn.dot_product_attention``:
    the BlockSpecs pick one (batch, head) column and the kernel slices rows itself, so
    nothing is transposed, padded or copied in HBM around the kernel;
  * the key tail is masked on one block only: the last visited block of a row, when it holds
    keys at or past ``min(L, kv_lengths[b])`` (a ragged last block, L not a multiple of the
    block, or a per-sample key length). Rows are sorted ascending (docs/spec.md §4), so the
    wrapper drops the listed blocks with no visible key as the row's tail and the block left
    last is the only partial one; every other block runs the unmasked fast path, and a call
    with neither a ragged L nor ``kv_lengths`` compiles no masked path at all. Query rows past
    a ragged L are handled with masked loads and stores.
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
from pallas_kernels.contract import (
    BlockLayout,
    check_block_sparse_inputs,
    check_positive_int,
    kernel_rows,
)

__all__ = [
    "TritonTuning",
    "block_sparse_attention",
    "block_sparse_attention_kernel",
    "block_sparse_attention_unchecked",
    "unsupported",
]

_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class TritonTuning:
    """Tuning of the kernel: its tiles inside one layout block of ``block_size`` tokens, its warps
    and its pipelining depth.

    Attributes:
      block_q: query rows per program (a power of two >= 16 dividing the layout block size).
      block_k: key rows per inner step (a power of two >= 16 dividing the layout block size).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the key loop.
    """

    block_q: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def for_dtype(cls, dtype) -> "TritonTuning":
        """The defaults (chosen on an H200: benchmarks/NOTES.md): 16-bit inputs take 128×128
        tiles, 8 warps, 3 stages; float32 tiles are smaller to fit shared memory at D=128."""
        if jnp.dtype(dtype).itemsize >= 4:
            return cls(block_q=64, block_k=32, num_warps=4, num_stages=2)
        return cls()

    def check(self, block_size: int) -> None:
        """Raises ``ValueError`` naming the field that cannot tile ``block_size``-token blocks."""
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not (is_power_of_two(value) and value >= 16 and block_size % value == 0):
                raise ValueError(
                    f"tuning.{name} must be a power of two >= 16 dividing block_size={block_size}, got {value!r}"
                )
        for name in ("num_warps", "num_stages"):
            check_positive_int(getattr(self, name), f"tuning.{name}")


def block_sparse_attention_kernel(
    q_ref,  # [L, D] of one (batch, head)
    k_ref,  # [L, D]
    v_ref,  # [L, D]
    idx_ref,  # [K_max] key-block indices of this query block
    cnt_ref,  # [1] how many of them to visit
    len_ref,  # [1] visible keys of this batch element (in [0, L]), or None: all L keys
    o_ref,  # [L, D]
    *,
    seq_len: int,
    block_size: int,
    block_q: int,
    block_k: int,
    qk_scale: float,
):
    """One program: ``block_q`` query rows against the listed key blocks.

    Keys at or past ``kv_len`` (``len_ref[0]`` when given, else the static ``seq_len``) are
    masked in the last visited block only; the wrapper guarantees that no other visited block
    holds such keys (for layouts keeping docs/spec.md §4) and that ``kv_len <= seq_len``, so one
    mask keeps both the loads in bounds and the logits of invisible keys out.
    """
    tile = pl.program_id(0)
    q_start = tile * block_q
    head_dim = q_ref.shape[-1]
    ragged = seq_len % block_size != 0
    if len_ref is None:
        kv_len = seq_len  # static: only a ragged L needs the masked block
        tail_mask = ragged
    else:
        kv_len = len_ref[0]
        tail_mask = True

    rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
    q_slice = pl.ds(q_start, block_q)
    if ragged:
        q = plgpu.load(q_ref.at[q_slice, :], mask=(rows < seq_len)[:, None], other=0.0)
    else:
        q = q_ref[q_slice, :]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    count = cnt_ref[0]

    def sub_step(k_start, carry, masked: bool):
        acc, m_prev, l_prev = carry
        k_slice = pl.ds(k_start, block_k)
        if masked:
            cols = k_start + jnp.arange(block_k, dtype=jnp.int32)
            col_ok = cols < kv_len
            k = plgpu.load(k_ref.at[k_slice, :], mask=col_ok[:, None], other=0.0)
            v = plgpu.load(v_ref.at[k_slice, :], mask=col_ok[:, None], other=0.0)
        else:
            k = k_ref[k_slice, :]
            v = v_ref[k_slice, :]
        # Logits in the base-2 domain: exp(x * scale) == exp2(x * scale * log2(e)).
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * qk_scale
        if masked:
            s = jnp.where(col_ok[None, :], s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        m_use = m_next
        if masked:
            # A row that has seen no visible key yet keeps m = -inf; exponentiate against 0 so
            # that it stays l = 0, acc = 0 (zeros) instead of NaN. Sorted rows never get here
            # with nothing visible (the masked block's first key is visible); this guards
            # layouts breaking docs/spec.md §4.
            m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l_next = l_prev * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[:, None] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision
        )
        return acc, m_next, l_next

    def block_step(masked: bool):
        def step(j, carry):
            # One layout block per iteration, its block_k-row slices unrolled.
            block_start = idx_ref[j] * block_size
            for sub in range(block_size // block_k):
                carry = sub_step(block_start + sub * block_k, carry, masked)
            return carry

        return step

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    if tail_mask:
        # Only the last visited block can hold keys at or past kv_len: rows are sorted (and
        # the wrapper moves the ragged block nk-1, when listed, to the end of any row), and
        # blocks with no visible key were dropped. Every other block runs unmasked, that one
        # alone with masks. A row with count 0 runs neither loop.
        last_block = idx_ref[jnp.maximum(count - 1, 0)]
        partial = (count > 0) & ((last_block + 1) * block_size > kv_len)
        unmasked = count - partial.astype(jnp.int32)
        carry = lax.fori_loop(0, unmasked, block_step(False), carry)
        acc, _, l = lax.fori_loop(unmasked, count, block_step(True), carry)
    else:
        acc, _, l = lax.fori_loop(0, count, block_step(False), carry)
    out = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
    if ragged:
        plgpu.store(o_ref.at[q_slice, :], out, mask=(rows < seq_len)[:, None])
    else:
        o_ref[q_slice, :] = out


def unsupported(q, block_size: int = 128) -> str | None:
    """Why this kernel cannot run ``q`` (``[B, L, N, D]``, checked by the contract) in
    ``block_size``-token blocks, or ``None``: its dtypes, head dims and block sizes."""
    if jnp.dtype(q.dtype) not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(q.dtype)} not supported (bfloat16, float16 or float32)"
    head_dim = q.shape[-1]
    if not (is_power_of_two(head_dim) and 16 <= head_dim <= 256):
        return f"head dim {head_dim} not supported (a power of two in [16, 256])"
    if not (is_power_of_two(block_size) and block_size >= 16):
        return f"block_size {block_size} not supported (a power of two >= 16)"
    return None


def block_sparse_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int = 128,
    scale: float | None = None,
    kv_lengths: Int[Array, " b"] | None = None,
    interpret: bool = False,
    tuning: TritonTuning | None = None,
    poison_output: bool = False,
) -> Float[Array, "b l n d"]:
    """Block-sparse attention over the key blocks listed in ``layout`` (docs/spec.md §5).

    Args:
      q, k, v: ``[B, L, N, D]`` (the layout of ``jax.nn.dot_product_attention``), bfloat16,
        float16 or float32; any L (the last block may be partial); D a power of two in
        [16, 256] (64 and 128 are the tested, tuned sizes).
      layout: a :class:`~pallas_kernels.contract.BlockLayout` ``[B, N, nq, K_max]`` with
        ``num_key_blocks == nq == ceil(L / block_size)``. Only the first ``kv_counts`` entries
        of each row are visited; they must be distinct valid block indices, sorted ascending
        (docs/spec.md §4; a concrete layout is checked here). Whatever a traced layout holds,
        the kernel never reads outside its inputs: counts are clipped to ``[0, K_max]`` and
        indices to ``[0, nk)``. A row with count 0 gives zeros.
      block_size: tokens per layout block (128 in DFSAttn), a power of two >= 16.
      scale: logit scale, default ``1/sqrt(D)``.
      kv_lengths: optional ``int[B]``, read at run time: keys at or past ``kv_lengths[b]`` are
        never attended (default L; docs/spec.md §6.1); a query row with no visible key gives
        zeros. Concrete values must lie in ``[0, L]``; traced ones are clipped to it. Listed
        blocks with no visible key are dropped as the tail of each row, which relies on rows
        sorted ascending (§4).
      interpret: run the kernel in the Pallas interpreter (any backend; slow, for tests).
      tuning: :class:`TritonTuning`; default :meth:`TritonTuning.for_dtype`.
      poison_output: for tests: the kernel writes into an all-NaN buffer, so that elements it
        fails to write stay visible.

    Returns:
      ``[B, L, N, D]`` in the input dtype; accumulation is float32.

    Raises:
      TypeError, ValueError: for inputs that break the contract (:mod:`pallas_kernels.contract`).
      NotImplementedError: for an input this kernel cannot take (:func:`unsupported` says why).
    """
    check_block_sparse_inputs(q, k, v, layout, block_size=block_size, kv_lengths=kv_lengths)
    refuse_unsupported(unsupported(q, block_size), "the Pallas Triton kernel")
    return block_sparse_attention_unchecked(
        q, k, v, layout, block_size=block_size, scale=scale, kv_lengths=kv_lengths, interpret=interpret,
        tuning=tuning, poison_output=poison_output,
    )  # fmt: skip


def block_sparse_attention_unchecked(
    q, k, v, layout, *, block_size, scale, kv_lengths, interpret=False, tuning=None, poison_output=False
) -> Float[Array, "b l n d"]:
    """:func:`block_sparse_attention` without the contract's checks, same arguments, for a caller
    that has made them (``dfsattn_jax``'s dispatch); the tuning and ``interpret`` are checked here."""
    tuning = TritonTuning.for_dtype(q.dtype) if tuning is None else tuning
    tuning.check(block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _block_sparse_attention(
        q, k, v, layout.kv_indices, layout.kv_counts, kv_lengths,
        block_size=block_size, scale=scale, tuning=tuning, interpret=check_interpret(interpret),
        poison_output=bool(poison_output), has_lengths=kv_lengths is not None,
    )  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("block_size", "scale", "tuning", "interpret", "poison_output", "has_lengths")
)
def _block_sparse_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    kv_indices: Int[Array, "b n nq kmax"],
    kv_counts: Int[Array, "b n nq"],
    kv_lengths: Int[Array, " b"] | None,
    *,
    block_size: int,
    scale: float,
    tuning: TritonTuning,
    interpret: bool,
    poison_output: bool,
    has_lengths: bool,
) -> Float[Array, "b l n d"]:
    batch, seq_len, heads, head_dim = q.shape
    nq = kv_counts.shape[-1]
    k_max = kv_indices.shape[-1]
    # Bounds for any traced layout: the kernel must never read outside q, k, v or the row.
    kv_indices, kv_counts, kv_lengths = kernel_rows(
        kv_indices, kv_counts, kv_lengths if has_lengths else None, seq_len=seq_len, block_size=block_size
    )
    block_q = tuning.block_q
    tiles_per_block = block_size // block_q
    kernel = functools.partial(
        block_sparse_attention_kernel,
        seq_len=seq_len,
        block_size=block_size,
        block_q=block_q,
        block_k=tuning.block_k,
        qk_scale=scale * LOG2E,
    )
    full = pl.BlockSpec((None, seq_len, None, head_dim), lambda t, b, n: (b, 0, n, 0))
    in_specs = [
        full,
        full,
        full,
        pl.BlockSpec((None, None, None, k_max), lambda t, b, n: (b, n, t // tiles_per_block, 0)),
        pl.BlockSpec((None, None, None, 1), lambda t, b, n: (b, n, t // tiles_per_block, 0)),
    ]
    operands = [q, k, v, kv_indices, kv_counts[..., None]]
    if has_lengths:
        # GPU Pallas has no scalar prefetch: the lengths are an input indexed by the batch id.
        in_specs.append(pl.BlockSpec((None, 1), lambda t, b, n: (b, 0)))
        operands.append(kv_lengths[:, None])
    kernel = _bind_refs(kernel, has_lengths=has_lengths, has_aliased_output=poison_output)
    aliases = {}
    if poison_output:
        operands.append(jnp.full(q.shape, jnp.nan, q.dtype))
        in_specs.append(full)
        aliases = {len(operands) - 1: 0}
    return pl.pallas_call(
        kernel,
        grid=(nq * tiles_per_block, batch, heads),
        in_specs=in_specs,
        out_specs=full,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=tuning.num_warps, num_stages=tuning.num_stages
        ),
        input_output_aliases=aliases,
        interpret=interpret,
        name="dfs_block_sparse_attention",
    )(*operands)


def _bind_refs(kernel, *, has_lengths: bool, has_aliased_output: bool):
    """Adapts the kernel to the refs of one call: ``q, k, v, idx, cnt``, then the lengths when
    given, then the output buffer when it also arrives as the last input (ignored), then ``o``."""

    def wrapped(q_ref, k_ref, v_ref, idx_ref, cnt_ref, *rest):
        rest = list(rest)
        len_ref = rest.pop(0) if has_lengths else None
        if has_aliased_output:
            rest.pop(0)
        (o_ref,) = rest
        kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, len_ref, o_ref)

    return wrapped
