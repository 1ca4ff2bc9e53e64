"""Token orders: permutations of a (frames, height, width) latent grid (SPEC §2).

Tokens of a grid ``(F, H, W)`` are numbered in raster order, ``i = f*H*W + h*W + w``. An
order is a permutation ``perm`` of ``range(F*H*W)``; the reordered sequence is ``x[perm]``
and ``x_reordered[inverse_permutation(perm)]`` restores it.

All orders are computed with vectorized NumPy on the host (they are static per grid, so
they are computed once and reused for every step and layer).

=============  ==================================================================
``raster``     identity
``hilbert3d``  sort by Skilling's 3D Hilbert index of ``(x=w, y=h, z=f)`` with
               ``bits = ceil(log2(max(F, H, W)))`` (1 if the max is 1); the grid is
               embedded in the ``2**bits`` cube and absent cells are skipped
``morton3d``   sort by the Z-order code ``x | y << 1 | z << 2`` (bits interleaved)
``hilbert2d``  frame-major; inside a frame Červený's generalized Hilbert ("gilbert")
               curve for ``W x H`` rectangles, started along the longer side
``block3d``    ``a x b x c`` boxes (option ``box=(a, b, c)``, default ``(4, 4, 4)``,
               along (F, H, W)) in raster order, raster order inside each box
=============  ==================================================================
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
from jaxtyping import Int, UInt64

__all__ = [
    "ORDER_NAMES",
    "check_grid",
    "token_order",
    "inverse_permutation",
    "hilbert_index",
    "morton_code",
    "gilbert2d",
]

ORDER_NAMES: tuple[str, ...] = ("raster", "hilbert3d", "morton3d", "hilbert2d", "block3d")


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
    """``ceil(log2(max(grid)))``, at least 1 (SPEC §2)."""
    return max(1, (max(grid) - 1).bit_length())


def _grid_coords(grid: tuple[int, int, int]) -> UInt64[np.ndarray, "l 3"]:
    """Coordinates ``[x=w, y=h, z=f]`` of every token, in raster order."""
    f, h, w = np.meshgrid(*(np.arange(n, dtype=np.uint64) for n in grid), indexing="ij")
    return np.stack([w.ravel(), h.ravel(), f.ravel()], axis=1)


def hilbert_index(coords: Int[np.ndarray, "p n"], bits: int) -> UInt64[np.ndarray, " p"]:
    """Skilling's Hilbert index of points of an ``n``-dimensional ``2**bits`` cube.

    Implements "Programming the Hilbert curve" (J. Skilling, AIP Conf. Proc. 707, 2004):
    the coordinates are transformed in place into the "transpose" form of the index
    (inverse undo of the excess work, then Gray encoding), whose bits are then interleaved,
    most significant first, coordinate 0 first. Vectorized over all points.

    Args:
      coords: non-negative integers ``< 2**bits``, one point per row, ``n`` columns.
      bits: bits per coordinate, ``bits * n <= 64``.

    Returns:
      uint64 Hilbert index of every point.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 1:
        raise ValueError(f"coords must have shape [points, dims], got {coords.shape}")
    bits = operator.index(bits)
    ndim = coords.shape[1]
    if bits < 1 or bits * ndim > 64:
        raise ValueError(f"bits must be in [1, {64 // ndim}] for {ndim} dims, got {bits}")
    if coords.size and (coords.min() < 0 or coords.max() >= (1 << bits)):
        raise ValueError(f"coords must lie in [0, 2**bits) = [0, {1 << bits})")
    x = [coords[:, i].astype(np.uint64) for i in range(ndim)]
    zero = np.uint64(0)

    # Inverse undo: walk the bits from the top, inverting or exchanging low bits.
    q = 1 << (bits - 1)
    while q > 1:
        low = np.uint64(q - 1)
        qbit = np.uint64(q)
        for i in range(ndim):
            set_ = (x[i] & qbit) != zero
            if i == 0:
                x[0] = np.where(set_, x[0] ^ low, x[0])
                continue
            swap = np.where(set_, zero, (x[0] ^ x[i]) & low)
            x[0] = np.where(set_, x[0] ^ low, x[0] ^ swap)
            x[i] = x[i] ^ swap
        q >>= 1

    # Gray encode.
    for i in range(1, ndim):
        x[i] = x[i] ^ x[i - 1]
    flip = np.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        flip = np.where((x[ndim - 1] & np.uint64(q)) != zero, flip ^ np.uint64(q - 1), flip)
        q >>= 1
    x = [xi ^ flip for xi in x]

    # Interleave the transposed bits: bit b of coordinate i is index bit b*n + (n-1-i).
    index = np.zeros_like(x[0])
    one = np.uint64(1)
    for b in range(bits - 1, -1, -1):
        for i in range(ndim):
            index = (index << one) | ((x[i] >> np.uint64(b)) & one)
    return index


def morton_code(coords: Int[np.ndarray, "p n"], bits: int) -> UInt64[np.ndarray, " p"]:
    """Z-order code: bit ``b`` of coordinate ``i`` goes to code bit ``b*n + i``."""
    coords = np.asarray(coords).astype(np.uint64)
    ndim = coords.shape[1]
    code = np.zeros(coords.shape[0], dtype=np.uint64)
    one = np.uint64(1)
    for b in range(bits):
        for i in range(ndim):
            code |= ((coords[:, i] >> np.uint64(b)) & one) << np.uint64(b * ndim + i)
    return code


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


def _hilbert3d(grid: tuple[int, int, int]) -> np.ndarray:
    index = hilbert_index(_grid_coords(grid), _bits_for(grid))
    return np.argsort(index, kind="stable")


def _morton3d(grid: tuple[int, int, int]) -> np.ndarray:
    index = morton_code(_grid_coords(grid), _bits_for(grid))
    return np.argsort(index, kind="stable")


def _hilbert2d(grid: tuple[int, int, int]) -> np.ndarray:
    frames, height, width = grid
    xy = gilbert2d(width, height)
    in_frame = xy[:, 1] * width + xy[:, 0]
    return (np.arange(frames, dtype=np.int64)[:, None] * (height * width) + in_frame[None, :]).ravel()


def _block3d(grid: tuple[int, int, int], box: Sequence[int]) -> np.ndarray:
    try:
        box_t = tuple(operator.index(b) for b in box)
    except TypeError:
        raise ValueError(f"box must be three positive integers (a, b, c), got {box!r}") from None
    if len(box_t) != 3 or any(b < 1 for b in box_t):
        raise ValueError(f"box must be three positive integers (a, b, c), got {box!r}")
    f, h, w = np.meshgrid(*(np.arange(n, dtype=np.int64) for n in grid), indexing="ij")
    a, b, c = box_t
    # np.lexsort sorts by the last key first.
    keys = (w.ravel() % c, h.ravel() % b, f.ravel() % a, w.ravel() // c, h.ravel() // b, f.ravel() // a)
    return np.lexsort(keys)


def token_order(name: str, grid: Sequence[int], **options) -> Int[np.ndarray, " l"]:
    """The permutation of ``range(F*H*W)`` that puts tokens of ``grid`` in order ``name``.

    Args:
      name: one of :data:`ORDER_NAMES`.
      grid: ``(F, H, W)``, the latent grid (frames, height, width).
      **options: ``box=(a, b, c)`` for ``block3d``; no other options exist.

    Returns:
      int32[F*H*W] permutation; ``x[:, perm]`` reorders a raster-ordered ``[B, L, ...]`` array.

    Raises:
      ValueError: for an unknown ``name``, a bad ``grid`` or an unexpected option.
    """
    if name not in ORDER_NAMES:
        raise ValueError(f"name must be one of {ORDER_NAMES}, got {name!r}")
    grid_t = check_grid(grid)
    allowed = {"box"} if name == "block3d" else set()
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"order {name!r} takes options {sorted(allowed)}, got unexpected {sorted(unknown)}")
    length = grid_t[0] * grid_t[1] * grid_t[2]
    if name == "raster":
        perm = np.arange(length)
    elif name == "hilbert3d":
        perm = _hilbert3d(grid_t)
    elif name == "morton3d":
        perm = _morton3d(grid_t)
    elif name == "hilbert2d":
        perm = _hilbert2d(grid_t)
    else:
        perm = _block3d(grid_t, options.get("box", (4, 4, 4)))
    return perm.astype(np.int32)


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
