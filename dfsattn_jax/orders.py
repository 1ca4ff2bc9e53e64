"""Token orders: permutations of a (frames, height, width) latent grid (docs/spec.md §2).

Tokens of a grid ``(F, H, W)`` are numbered in raster order, ``i = f*H*W + h*W + w``. An
order is a permutation ``perm`` of ``range(F*H*W)``; the reordered sequence is ``x[perm]``
and ``x_reordered[inverse_permutation(perm)]`` restores it.

The Hilbert and Morton keys are computed with ``jax.numpy`` uint32 bit operations,
vectorized over all tokens (the only Python loops are static ones over the at most 10 bits
per coordinate), and the permutation is a stable ``argsort`` of the keys inside ``jax.jit``
(:func:`token_order_jax`, usable inside a traced function: ``name``, ``grid`` and ``box``
are static). :func:`token_order` is the NumPy boundary: it runs the same jitted code on the
host CPU (compiled once per order and grid) and returns an ``np.int32`` array. Orders are static per grid, so they are computed
once and reused for every step and layer.

=============  ==================================================================
``raster``     identity
``hilbert3d``  sort by Skilling's 3D Hilbert index of ``(x=w, y=h, z=f)`` with
               ``bits = ceil(log2(max(F, H, W)))`` (1 if the max is 1); the grid is
               embedded in the ``2**bits`` cube and absent cells are skipped (only the
               grid's own coordinates are encoded)
``morton3d``   sort by the Z-order code ``x | y << 1 | z << 2`` (bits interleaved)
``hilbert2d``  frame-major; inside a frame Červený's generalized Hilbert ("gilbert")
               curve for ``W x H`` rectangles, started along the longer side
``block3d``    ``a x b x c`` boxes (option ``box=(a, b, c)``, default ``(4, 4, 4)``,
               along (F, H, W)) in raster order, raster order inside each box
=============  ==================================================================

Keys are uint32, so ``bits * ndim <= 32``: ``hilbert3d`` and ``morton3d`` take grids whose
sides are at most :data:`MAX_KEY_SIDE` ``= 1024`` (``2**10``); a larger side is a
``ValueError`` naming that limit. ``raster``, ``hilbert2d`` and ``block3d`` have no such
limit.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, Int32, UInt32, UInt64

__all__ = [
    "ORDER_NAMES",
    "MAX_KEY_SIDE",
    "check_grid",
    "token_order",
    "token_order_jax",
    "inverse_permutation",
    "hilbert_keys",
    "morton_keys",
    "hilbert_index",
    "morton_code",
    "gilbert2d",
]

ORDER_NAMES: tuple[str, ...] = ("raster", "hilbert3d", "morton3d", "hilbert2d", "block3d")

_KEY_BITS = 32  # the keys are uint32
MAX_KEY_SIDE: int = 1 << (_KEY_BITS // 3)  # 1024: the largest grid side of hilbert3d / morton3d


def check_grid(grid: Sequence[int], length: int | None = None) -> tuple[int, int, int]:
    """Validates a latent grid ``(F, H, W)`` and returns it as a tuple of Python ints.

    Args:
      grid: three positive integers ``(frames, height, width)``.
      length: if given, the number of (video) tokens the grid must describe, ``F*H*W``.

    Raises:
      ValueError: naming ``grid`` when it is not three positive integers or does not match
        ``length``.
    """
    try:
        dims = tuple(operator.index(g) for g in grid)
    except TypeError:
        raise ValueError(f"grid must be three positive integers (F, H, W), got {grid!r}") from None
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise ValueError(f"grid must be three positive integers (F, H, W), got {grid!r}")
    if length is not None:
        length = operator.index(length)
        if dims[0] * dims[1] * dims[2] != length:
            raise ValueError(
                f"grid {dims} holds {dims[0] * dims[1] * dims[2]} tokens, expected F*H*W == {length}"
            )
    return dims  # type: ignore[return-value]


def _bits_for(grid: tuple[int, int, int]) -> int:
    """``ceil(log2(max(grid)))``, at least 1 (docs/spec.md §2)."""
    return max(1, (max(grid) - 1).bit_length())


def _check_bits(bits: int, ndim: int) -> int:
    bits = operator.index(bits)
    if ndim < 1:
        raise ValueError(f"coords must have at least one column (dimension), got {ndim}")
    if bits < 1 or bits * ndim > _KEY_BITS:
        raise ValueError(
            f"bits must be in [1, {_KEY_BITS // ndim}] for {ndim} dims (uint32 keys hold "
            f"bits * dims <= {_KEY_BITS}), got {bits}"
        )
    return bits


def hilbert_keys(coords: Int[Array, "p n"], bits: int) -> UInt32[Array, " p"]:
    """Skilling's Hilbert index of points of an ``n``-dimensional ``2**bits`` cube, in jnp.

    Implements "Programming the Hilbert curve" (J. Skilling, AIP Conf. Proc. 707, 2004):
    the coordinates are transformed into the "transpose" form of the index (inverse undo of
    the excess work, then Gray encoding), whose bits are then interleaved, most significant
    first, coordinate 0 first; bit ``b`` of transposed coordinate ``i`` becomes index bit
    ``b*n + (n-1-i)``. Equal to ``hilbert.encode(coords, n, bits)`` of the PyPI package
    ``numpy-hilbert-curve``.

    Pure and jit-able (``bits`` static): uint32 bit operations vectorized over the points,
    a static Python loop over the bits. The coordinates are not range-checked here (they
    may be traced); values outside ``[0, 2**bits)`` give meaningless keys.

    Args:
      coords: ``[p, n]`` non-negative integers ``< 2**bits``, one point per row.
      bits: bits per coordinate, ``1 <= bits`` and ``bits * n <= 32``.

    Returns:
      ``uint32[p]`` Hilbert index of every point.

    Raises:
      ValueError: if ``coords`` is not 2-D or ``bits`` is out of range.
    """
    coords = jnp.asarray(coords)
    if coords.ndim != 2:
        raise ValueError(f"coords must have shape [points, dims], got {coords.shape}")
    ndim = coords.shape[1]
    bits = _check_bits(bits, ndim)
    x = [coords[:, i].astype(jnp.uint32) for i in range(ndim)]
    zero = jnp.uint32(0)

    # Inverse undo: walk the bits from the top, inverting or exchanging low bits.
    for level in range(bits - 1, 0, -1):
        qbit, low = jnp.uint32(1 << level), jnp.uint32((1 << level) - 1)
        for i in range(ndim):
            set_ = (x[i] & qbit) != zero
            if i == 0:
                x[0] = jnp.where(set_, x[0] ^ low, x[0])
                continue
            swap = jnp.where(set_, zero, (x[0] ^ x[i]) & low)
            x[0] = jnp.where(set_, x[0] ^ low, x[0] ^ swap)
            x[i] = x[i] ^ swap

    # Gray encode.
    for i in range(1, ndim):
        x[i] = x[i] ^ x[i - 1]
    flip = jnp.zeros_like(x[0])
    for level in range(bits - 1, 0, -1):
        set_ = (x[ndim - 1] & jnp.uint32(1 << level)) != zero
        flip = jnp.where(set_, flip ^ jnp.uint32((1 << level) - 1), flip)
    x = [xi ^ flip for xi in x]

    # Interleave the transposed bits, most significant first.
    index = jnp.zeros_like(x[0])
    one = jnp.uint32(1)
    for b in range(bits - 1, -1, -1):
        for i in range(ndim):
            index = (index << one) | ((x[i] >> jnp.uint32(b)) & one)
    return index


def morton_keys(coords: Int[Array, "p n"], bits: int) -> UInt32[Array, " p"]:
    """Z-order code in jnp: bit ``b`` of coordinate ``i`` goes to code bit ``b*n + i``.

    Pure and jit-able (``bits`` static), uint32 bit operations vectorized over the points.

    Args:
      coords: ``[p, n]`` non-negative integers ``< 2**bits``, one point per row.
      bits: bits per coordinate, ``1 <= bits`` and ``bits * n <= 32``.

    Returns:
      ``uint32[p]`` Morton code of every point.
    """
    coords = jnp.asarray(coords)
    if coords.ndim != 2:
        raise ValueError(f"coords must have shape [points, dims], got {coords.shape}")
    ndim = coords.shape[1]
    bits = _check_bits(bits, ndim)
    x = [coords[:, i].astype(jnp.uint32) for i in range(ndim)]
    code = jnp.zeros_like(x[0])
    one = jnp.uint32(1)
    for b in range(bits):
        for i in range(ndim):
            code = code | (((x[i] >> jnp.uint32(b)) & one) << jnp.uint32(b * ndim + i))
    return code


def _host_keys(fn, coords: Int[np.ndarray, "p n"], bits: int) -> UInt64[np.ndarray, " p"]:
    """NumPy boundary of :func:`hilbert_keys` / :func:`morton_keys`."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 1:
        raise ValueError(f"coords must have shape [points, dims], got {coords.shape}")
    bits = _check_bits(bits, coords.shape[1])
    if coords.size and (coords.min() < 0 or coords.max() >= (1 << bits)):
        raise ValueError(f"coords must lie in [0, 2**bits) = [0, {1 << bits})")
    coords = coords.astype(np.uint32)
    spec = jax.ShapeDtypeStruct(coords.shape, coords.dtype)
    keys = _host_executable(_jit_keys, fn, spec, bits)(coords)
    return np.asarray(keys).astype(np.uint64)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jit_keys(fn, coords, bits):
    return fn(coords, bits)


def hilbert_index(coords: Int[np.ndarray, "p n"], bits: int) -> UInt64[np.ndarray, " p"]:
    """NumPy boundary of :func:`hilbert_keys`: Skilling's Hilbert index of host points.

    Args:
      coords: ``[p, n]`` non-negative integers ``< 2**bits``, one point per row.
      bits: bits per coordinate, ``bits * n <= 32`` (the keys are computed as uint32).

    Returns:
      ``uint64[p]`` Hilbert index of every point (the uint32 keys, widened).

    Raises:
      ValueError: for a bad shape, ``bits`` out of range, or coordinates out of range.
    """
    return _host_keys(hilbert_keys, coords, bits)


def morton_code(coords: Int[np.ndarray, "p n"], bits: int) -> UInt64[np.ndarray, " p"]:
    """NumPy boundary of :func:`morton_keys`: bit ``b`` of coordinate ``i`` goes to ``b*n + i``.

    Returns:
      ``uint64[p]`` Z-order code of every point (the uint32 keys, widened).
    """
    return _host_keys(morton_keys, coords, bits)


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def gilbert2d(width: int, height: int) -> Int[np.ndarray, "p 2"]:
    """Červený's generalized Hilbert curve over a ``width x height`` rectangle.

    The rectangle is described by a corner and two axis vectors, ``a`` (the major
    direction, along which the curve travels) and ``b`` (the orthogonal one). Each step
    either fills a one-cell-thick strip, cuts a long rectangle (``2|a| > 3|b|``) into two
    halves along ``a``, or applies the Hilbert template: a half-height piece going "up"
    along ``b`` (axes swapped), the full-width remainder along ``a``, and a piece coming
    back "down". Halves are rounded to even lengths where possible so that the curve stays
    connected. The curve starts at (0, 0) along the longer side.

    This one stays a host-side (Python/NumPy) recursion: the cuts depend on the rectangle's
    sides at every level, so unlike the Hilbert and Morton keys there is no closed bit-op
    form per token. It is static per grid; :func:`token_order_jax` embeds it as a constant.

    Returns:
      int64[width*height, 2] coordinates ``(x, y)`` in curve order.
    """
    width, height = operator.index(width), operator.index(height)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    out = np.empty((width * height, 2), dtype=np.int64)
    pos = 0
    if width >= height:
        stack = [(0, 0, width, 0, 0, height)]
    else:
        stack = [(0, 0, 0, height, width, 0)]
    # Depth-first with an explicit stack; pieces are pushed in reverse so they pop in order.
    while stack:
        x, y, ax, ay, bx, by = stack.pop()
        w, h = abs(ax + ay), abs(bx + by)
        dax, day = _sign(ax), _sign(ay)
        dbx, dby = _sign(bx), _sign(by)
        if h == 1 or w == 1:
            n, dx, dy = (w, dax, day) if h == 1 else (h, dbx, dby)
            steps = np.arange(n, dtype=np.int64)
            out[pos : pos + n, 0] = x + dx * steps
            out[pos : pos + n, 1] = y + dy * steps
            pos += n
            continue
        ax2, ay2 = ax // 2, ay // 2
        bx2, by2 = bx // 2, by // 2
        if 2 * w > 3 * h:
            if abs(ax2 + ay2) % 2 and w > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            pieces = [
                (x, y, ax2, ay2, bx, by),
                (x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by),
            ]
        else:
            if abs(bx2 + by2) % 2 and h > 2:
                bx2, by2 = bx2 + dbx, by2 + dby
            pieces = [
                (x, y, bx2, by2, ax2, ay2),
                (x + bx2, y + by2, ax, ay, bx - bx2, by - by2),
                (
                    x + (ax - dax) + (bx2 - dbx),
                    y + (ay - day) + (by2 - dby),
                    -bx2,
                    -by2,
                    -(ax - ax2),
                    -(ay - ay2),
                ),
            ]
        stack.extend(reversed(pieces))
    assert pos == width * height
    return out


def _grid_coords(grid: tuple[int, int, int]) -> UInt32[Array, "l 3"]:
    """Coordinates ``[x=w, y=h, z=f]`` of every token of ``grid``, in raster order."""
    f, h, w = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.uint32) for n in grid), indexing="ij")
    return jnp.stack([w.ravel(), h.ravel(), f.ravel()], axis=1)


def _key_bits(name: str, grid: tuple[int, int, int]) -> int:
    if max(grid) > MAX_KEY_SIDE:
        raise ValueError(
            f"order {name!r} uses uint32 keys, which hold grid sides up to {MAX_KEY_SIDE} "
            f"(2**{_KEY_BITS // 3} per axis, 3 axes); got grid {grid}"
        )
    return _bits_for(grid)


def _check_box(box: Sequence[int]) -> tuple[int, int, int]:
    try:
        box_t = tuple(operator.index(b) for b in box)
    except TypeError:
        raise ValueError(f"box must be three positive integers (a, b, c), got {box!r}") from None
    if len(box_t) != 3 or any(b < 1 for b in box_t):
        raise ValueError(f"box must be three positive integers (a, b, c), got {box!r}")
    return box_t  # type: ignore[return-value]


def _check_order(name: str, grid: Sequence[int], options: dict) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """Validates ``token_order`` arguments; returns the grid and the block3d box (else None)."""
    if name not in ORDER_NAMES:
        raise ValueError(f"name must be one of {ORDER_NAMES}, got {name!r}")
    grid_t = check_grid(grid)
    allowed = {"box"} if name == "block3d" else set()
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"order {name!r} takes options {sorted(allowed)}, got unexpected {sorted(unknown)}")
    if grid_t[0] * grid_t[1] * grid_t[2] >= 2**31:
        raise ValueError(f"grid {grid_t} holds {grid_t[0] * grid_t[1] * grid_t[2]} tokens; int32 orders need < 2**31")
    if name in ("hilbert3d", "morton3d"):
        _key_bits(name, grid_t)
    box = _check_box(options.get("box", (4, 4, 4))) if name == "block3d" else None
    return grid_t, box


def _order(name: str, grid: tuple[int, int, int], box: tuple[int, int, int] | None) -> Int32[Array, " l"]:
    """Traceable body of :func:`token_order_jax` (all arguments static, already checked)."""
    frames, height, width = grid
    length = frames * height * width
    if name == "raster":
        return jnp.arange(length, dtype=jnp.int32)
    if name in ("hilbert3d", "morton3d"):
        keys_fn = hilbert_keys if name == "hilbert3d" else morton_keys
        keys = keys_fn(_grid_coords(grid), _key_bits(name, grid))
        return jnp.argsort(keys, stable=True).astype(jnp.int32)
    if name == "hilbert2d":
        xy = gilbert2d(width, height)  # host constant, see gilbert2d
        in_frame = jnp.asarray(xy[:, 1] * width + xy[:, 0], dtype=jnp.int32)
        start = jnp.arange(frames, dtype=jnp.int32)[:, None] * jnp.int32(height * width)
        return (start + in_frame[None, :]).ravel()
    # block3d: boxes in raster order, raster order inside each box (lexsort: last key first).
    a, b, c = box
    f, h, w = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.int32) for n in grid), indexing="ij")
    f, h, w = f.ravel(), h.ravel(), w.ravel()
    keys = (w % c, h % b, f % a, w // c, h // b, f // a)
    return jnp.lexsort(keys).astype(jnp.int32)


_order_jit = jax.jit(_order, static_argnums=(0, 1, 2))


def token_order_jax(name: str, grid: Sequence[int], **options) -> Int32[Array, " l"]:
    """:func:`token_order` as a jitted ``jax.Array``; callable inside ``jax.jit``.

    ``name``, ``grid`` and ``options`` are static Python values (one compilation per
    distinct order, grid and box); the result is ``int32[F*H*W]`` on the default device,
    or a tracer when called inside a traced function.

    Raises:
      ValueError: as :func:`token_order`.
    """
    grid_t, box = _check_order(name, grid, options)
    return _order_jit(name, grid_t, box)


def _host_device() -> jax.Device | None:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend configured: use the default device
        return None


@functools.lru_cache(maxsize=128)
def _host_executable(fn, *args):
    """``fn`` (a jitted function) lowered for ``args`` (static values and
    ``jax.ShapeDtypeStruct``) and compiled for the host CPU, cached.

    Calling a compiled executable runs it concretely, also while an outer function is being
    traced (a plain jitted call would be staged into that trace and give tracers).
    """
    device = _host_device()
    if device is None:
        return fn.lower(*args).compile()
    with jax.default_device(device):
        return fn.lower(*args).compile()


def token_order(name: str, grid: Sequence[int], **options) -> Int[np.ndarray, " l"]:
    """The permutation of ``range(F*H*W)`` that puts tokens of ``grid`` in order ``name``.

    The NumPy boundary of :func:`token_order_jax`: the same jitted code, compiled once per
    ``(name, grid, box)`` for the host CPU and run concretely (also when called while an
    outer function is being traced); the result is copied out as NumPy.

    Args:
      name: one of :data:`ORDER_NAMES`.
      grid: ``(F, H, W)``, the latent grid (frames, height, width).
      **options: ``box=(a, b, c)`` for ``block3d``; no other options exist.

    Returns:
      int32[F*H*W] NumPy permutation; ``x[:, perm]`` reorders a raster-ordered ``[B, L, ...]``
      array.

    Raises:
      ValueError: for an unknown ``name``, a bad ``grid`` or ``box``, an unexpected option,
        or a ``hilbert3d`` / ``morton3d`` grid side above :data:`MAX_KEY_SIDE` (1024).
    """
    grid_t, box = _check_order(name, grid, options)
    perm = _host_executable(_order_jit, name, grid_t, box)()
    return np.array(perm, dtype=np.int32)  # a writable copy, as before


def inverse_permutation(perm: Int[np.ndarray, " l"]) -> Int[np.ndarray, " l"]:
    """The permutation ``inv`` with ``inv[perm] == arange(L)``, so ``x[perm][inv] == x``.

    Raises:
      ValueError: if ``perm`` is not a permutation of ``range(len(perm))``.
    """
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"perm must be a 1-D integer array, got shape {perm.shape} dtype {perm.dtype}")
    n = perm.shape[0]
    if n and (perm.min() < 0 or perm.max() >= n or np.unique(perm).shape[0] != n):
        raise ValueError("perm must be a permutation of range(len(perm))")
    inv = np.empty(n, dtype=perm.dtype)
    inv[perm] = np.arange(n, dtype=perm.dtype)
    return inv
