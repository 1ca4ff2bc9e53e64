"""Token orders (docs/spec.md §2): permutations, the peer Hilbert index, check values, locality,
and the jnp (jit-able) keys against the former NumPy bit implementation."""

import hashlib
import itertools

import hilbert  # numpy-hilbert-curve: the independent peer implementation
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfsattn_jax.orders import (
    MAX_KEY_SIDE,
    ORDER_NAMES,
    check_grid,
    gilbert2d,
    hilbert_index,
    hilbert_keys,
    inverse_permutation,
    morton_code,
    morton_keys,
    token_order,
    token_order_jax,
)

GRIDS = [(1, 1, 1), (1, 5, 7), (3, 4, 5), (2, 8, 8), (5, 3, 2), (4, 1, 6), (6, 9, 1)]


def md5(perm: np.ndarray) -> str:
    return hashlib.md5(np.asarray(perm, dtype="<i8").tobytes()).hexdigest()


def coords_of(grid, perm):
    """(f, h, w) of the tokens in the order ``perm``."""
    f, h, w = np.unravel_index(perm, grid)
    return np.stack([f, h, w], axis=1)


@pytest.mark.parametrize("name", ORDER_NAMES)
@pytest.mark.parametrize("grid", GRIDS)
def test_every_order_is_a_permutation_and_inverts(name, grid):
    perm = token_order(name, grid)
    length = int(np.prod(grid))
    assert perm.dtype == np.int32
    assert perm.shape == (length,)
    np.testing.assert_array_equal(np.sort(perm), np.arange(length))
    inv = inverse_permutation(perm)
    x = np.random.default_rng(0).normal(size=(length, 3))
    np.testing.assert_array_equal(x[perm][inv], x)
    np.testing.assert_array_equal(perm[inv], np.arange(length))


PEER_GRIDS = [
    (1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 1, 7), (7, 1, 1), (1, 6, 10), (1, 45, 80),
    (2, 2, 2), (4, 4, 4), (8, 8, 8), (3, 5, 7), (5, 7, 3), (7, 3, 5), (6, 6, 6),
    (9, 9, 9), (2, 16, 3), (13, 1, 17), (16, 16, 16), (17, 17, 17), (21, 30, 52),
    (4, 32, 2), (3, 64, 65),
]


@pytest.mark.parametrize("grid", PEER_GRIDS)
def test_hilbert3d_equals_peer_package(grid):
    frames, height, width = grid
    bits = max(1, int(np.ceil(np.log2(max(grid)))))
    f, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    coords = np.stack([w.ravel(), h.ravel(), f.ravel()], axis=1)  # columns [x, y, z]
    expected = np.argsort(hilbert.encode(coords, 3, bits), kind="stable")
    np.testing.assert_array_equal(token_order("hilbert3d", grid), expected)


def test_check_values_from_spec():
    perm = token_order("hilbert3d", (21, 45, 80))
    assert md5(perm) == "fb4baf92a7a7e8019f7dff31490824ef"
    np.testing.assert_array_equal(perm[:12], [0, 3600, 3680, 80, 81, 3681, 3601, 1, 2, 3, 83, 82])
    assert md5(token_order("hilbert3d", (33, 45, 80))) == "2bd2baf7c46144382ad7e0ae2fc840bd"
    assert md5(token_order("morton3d", (21, 45, 80))) == "e25eb13a43acef03c90d132e5a52dcde"
    assert md5(token_order("block3d", (21, 45, 80), box=(4, 4, 4))) == "73ec96ac001e69af60c835e369f9925d"
    assert md5(token_order("block3d", (21, 45, 80))) == "73ec96ac001e69af60c835e369f9925d"


CHECK_VALUES = [  # docs/spec.md §2
    (("hilbert3d", (21, 45, 80), {}), "fb4baf92a7a7e8019f7dff31490824ef"),
    (("hilbert3d", (33, 45, 80), {}), "2bd2baf7c46144382ad7e0ae2fc840bd"),
    (("morton3d", (21, 45, 80), {}), "e25eb13a43acef03c90d132e5a52dcde"),
    (("block3d", (21, 45, 80), {"box": (4, 4, 4)}), "73ec96ac001e69af60c835e369f9925d"),
    (("block3d", (21, 45, 80), {}), "73ec96ac001e69af60c835e369f9925d"),
]


@pytest.mark.parametrize("args,expected", CHECK_VALUES)
def test_jitted_order_reproduces_check_values(args, expected):
    name, grid, options = args
    direct = token_order_jax(name, grid, **options)
    assert isinstance(direct, jax.Array) and direct.dtype == jnp.int32
    assert md5(np.asarray(direct)) == expected
    # Inside an outer jit the order is traced (static name, grid, box) and still the same.
    inside = jax.jit(lambda: token_order_jax(name, grid, **options))()
    assert md5(np.asarray(inside)) == expected


def test_token_order_is_concrete_numpy_inside_a_trace():
    seen = []

    @jax.jit
    def reorder(x):
        perm = token_order("hilbert3d", (3, 4, 5))
        seen.append(perm)
        return x[perm]

    x = jnp.arange(60.0)
    out = reorder(x)
    assert isinstance(seen[0], np.ndarray) and seen[0].dtype == np.int32
    np.testing.assert_array_equal(out, np.asarray(x)[token_order("hilbert3d", (3, 4, 5))])


@pytest.mark.parametrize("name", ORDER_NAMES)
@pytest.mark.parametrize("grid", GRIDS + [(3, 64, 65), (13, 1, 17)])
def test_token_order_jax_equals_token_order(name, grid):
    np.testing.assert_array_equal(np.asarray(token_order_jax(name, grid)), token_order(name, grid))


# The former NumPy implementation of the keys (uint64, host-side), kept verbatim as the
# reference that the jnp uint32 keys must reproduce bit for bit.
def numpy_hilbert_index(coords, bits):
    x = [coords[:, i].astype(np.uint64) for i in range(coords.shape[1])]
    ndim, zero = len(x), np.uint64(0)
    q = 1 << (bits - 1)
    while q > 1:
        low, qbit = np.uint64(q - 1), np.uint64(q)
        for i in range(ndim):
            set_ = (x[i] & qbit) != zero
            if i == 0:
                x[0] = np.where(set_, x[0] ^ low, x[0])
                continue
            swap = np.where(set_, zero, (x[0] ^ x[i]) & low)
            x[0] = np.where(set_, x[0] ^ low, x[0] ^ swap)
            x[i] = x[i] ^ swap
        q >>= 1
    for i in range(1, ndim):
        x[i] = x[i] ^ x[i - 1]
    flip = np.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        flip = np.where((x[ndim - 1] & np.uint64(q)) != zero, flip ^ np.uint64(q - 1), flip)
        q >>= 1
    x = [xi ^ flip for xi in x]
    index, one = np.zeros_like(x[0]), np.uint64(1)
    for b in range(bits - 1, -1, -1):
        for i in range(ndim):
            index = (index << one) | ((x[i] >> np.uint64(b)) & one)
    return index


def numpy_morton_code(coords, bits):
    coords = coords.astype(np.uint64)
    ndim = coords.shape[1]
    code, one = np.zeros(coords.shape[0], dtype=np.uint64), np.uint64(1)
    for b in range(bits):
        for i in range(ndim):
            code |= ((coords[:, i] >> np.uint64(b)) & one) << np.uint64(b * ndim + i)
    return code


def grid_coords(grid):
    f, h, w = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    return np.stack([w.ravel(), h.ravel(), f.ravel()], axis=1)  # columns [x, y, z]


def bits_for(grid):
    return max(1, int(max(grid) - 1).bit_length())


KEY_GRIDS = PEER_GRIDS + [(1, 1, 1024), (3, 1000, 2), (1024, 2, 1), (5, 129, 3), (31, 33, 63), (2, 511, 513)]


@pytest.mark.parametrize("grid", KEY_GRIDS)
def test_jnp_keys_equal_the_numpy_bits_on_grids(grid):
    coords, bits = grid_coords(grid), bits_for(grid)
    keys = jax.jit(hilbert_keys, static_argnums=1)(jnp.asarray(coords, dtype=jnp.uint32), bits)
    assert keys.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(keys, dtype=np.uint64), numpy_hilbert_index(coords, bits))
    codes = jax.jit(morton_keys, static_argnums=1)(jnp.asarray(coords, dtype=jnp.int32), bits)
    assert codes.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(codes, dtype=np.uint64), numpy_morton_code(coords, bits))
    # The orders are the stable argsorts of those bits.
    for name, reference in (("hilbert3d", numpy_hilbert_index), ("morton3d", numpy_morton_code)):
        expected = np.argsort(reference(coords, bits), kind="stable")
        np.testing.assert_array_equal(token_order(name, grid), expected)


@pytest.mark.parametrize("ndim,bits", [(1, 1), (1, 32), (2, 1), (2, 7), (2, 16), (3, 1), (3, 5), (3, 10), (4, 8), (5, 6)])
def test_jnp_keys_equal_the_numpy_bits_on_random_points(ndim, bits):
    rng = np.random.default_rng(1000 * ndim + bits)
    coords = rng.integers(0, 1 << bits, size=(500, ndim), dtype=np.uint64)
    coords[0] = (1 << bits) - 1  # the far corner
    coords[1] = 0
    np.testing.assert_array_equal(hilbert_index(coords, bits), numpy_hilbert_index(coords, bits))
    np.testing.assert_array_equal(morton_code(coords, bits), numpy_morton_code(coords, bits))
    assert hilbert_index(coords, bits).dtype == np.uint64
    if ndim == 3:  # and the peer package
        np.testing.assert_array_equal(hilbert_index(coords, bits), hilbert.encode(coords.astype(np.int64), 3, bits))


def test_key_limits():
    # uint32 keys: sides up to 1024 (10 bits per axis) are fine, 1025 is a ValueError naming the limit.
    assert MAX_KEY_SIDE == 1024
    token_order("hilbert3d", (1, 1, 1024))
    for name in ("hilbert3d", "morton3d"):
        for grid in [(1, 1, 1025), (1025, 1, 1), (2, 2048, 2)]:
            with pytest.raises(ValueError, match="1024"):
                token_order(name, grid)
            with pytest.raises(ValueError, match="1024"):
                token_order_jax(name, grid)
    # Orders without keys have no such limit.
    np.testing.assert_array_equal(token_order("raster", (1, 1, 1025)), np.arange(1025))
    np.testing.assert_array_equal(token_order("block3d", (1, 1, 1025)), np.arange(1025))
    with pytest.raises(ValueError, match="bits"):
        hilbert_keys(jnp.zeros((4, 3), jnp.uint32), 11)
    with pytest.raises(ValueError, match="bits"):
        morton_keys(jnp.zeros((4, 2), jnp.uint32), 17)
    with pytest.raises(ValueError, match="bits"):
        hilbert_index(np.zeros((4, 3), np.int64), 0)
    with pytest.raises(ValueError, match="coords"):
        hilbert_index(np.array([[0, 0, 4]]), 2)
    with pytest.raises(ValueError, match="coords"):
        morton_code(np.zeros(4, np.int64), 2)


@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_hilbert3d_consecutive_tokens_are_neighbours_on_cubes(side):
    grid = (side, side, side)
    xyz = coords_of(grid, token_order("hilbert3d", grid))
    steps = np.abs(np.diff(xyz, axis=0)).sum(axis=1)
    np.testing.assert_array_equal(steps, np.ones(side**3 - 1))


@pytest.mark.parametrize("side", [4, 8])
def test_morton3d_groups_aligned_cubes(side):
    grid = (side, side, side)
    xyz = coords_of(grid, token_order("morton3d", grid))
    for level in (2, 4):
        for chunk in xyz.reshape(-1, level**3, 3):
            # Each run of level**3 tokens is one aligned level x level x level cube.
            assert np.all(chunk.max(0) - chunk.min(0) == level - 1)
            assert np.all(chunk.min(0) % level == 0)
    # Within a 2x2x2 cube the bits are interleaved as x | y << 1 | z << 2 (x = w fastest).
    first = xyz[:8]
    np.testing.assert_array_equal(first[:, 2] + 2 * first[:, 1] + 4 * first[:, 0], np.arange(8))


def brute_force_block3d(grid, box):
    frames, height, width = grid
    a, b, c = box
    out = []
    for f0, h0, w0 in itertools.product(range(0, frames, a), range(0, height, b), range(0, width, c)):
        for f, h, w in itertools.product(
            range(f0, min(f0 + a, frames)), range(h0, min(h0 + b, height)), range(w0, min(w0 + c, width))
        ):
            out.append((f * height + h) * width + w)
    return np.array(out)


@pytest.mark.parametrize("grid,box", [((9, 10, 11), (4, 4, 4)), ((5, 7, 6), (2, 3, 5)), ((3, 3, 3), (1, 1, 1))])
def test_block3d_matches_brute_force(grid, box):
    np.testing.assert_array_equal(token_order("block3d", grid, box=box), brute_force_block3d(grid, box))


def parity_forced(width, height):
    """True when no path of unit steps can join the start and the far corner on the major side."""
    end = (width - 1, 0) if width >= height else (0, height - 1)
    return (width * height) % 2 == 0 and sum(end) % 2 == 0


@pytest.mark.parametrize("width,height", [(w, h) for w in range(1, 24, 2) for h in range(1, 24, 3)] + [(80, 45), (45, 80), (52, 30)])
def test_gilbert2d_is_a_near_continuous_curve(width, height):
    xy = gilbert2d(width, height)
    assert xy.shape == (width * height, 2)
    np.testing.assert_array_equal(np.sort(xy[:, 1] * width + xy[:, 0]), np.arange(width * height))
    np.testing.assert_array_equal(xy[0], [0, 0])
    if width * height > 1:
        steps = np.abs(np.diff(xy, axis=0))
        assert np.all(steps.max(axis=1) == 1)
        diagonal = int(np.sum(steps.sum(axis=1) == 2))
        end = (width - 1, 0) if width >= height else (0, height - 1)
        if parity_forced(width, height):
            assert diagonal <= 1
        else:
            assert diagonal == 0
            assert tuple(xy[-1]) == end


@pytest.mark.parametrize("side", [8, 16])
def test_gilbert2d_on_power_of_two_squares_is_hilbert(side):
    xy = gilbert2d(side, side)
    for level in (2, 4, side // 2):
        for chunk in xy.reshape(-1, level * level, 2):
            assert np.all(chunk.max(0) - chunk.min(0) == level - 1)
            assert np.all(chunk.min(0) % level == 0)


def test_hilbert2d_is_frame_major_and_reuses_the_frame_curve():
    grid = (3, 5, 9)
    frame = 5 * 9
    perm = token_order("hilbert2d", grid)
    xy = gilbert2d(9, 5)
    for f in range(3):
        np.testing.assert_array_equal(perm[f * frame : (f + 1) * frame], f * frame + xy[:, 1] * 9 + xy[:, 0])
    # Started along the longer side: the first frame's curve ends at the far end of the width.
    np.testing.assert_array_equal(np.unravel_index(perm[frame - 1], grid), (0, 0, 8))


def test_check_grid():
    assert check_grid((2, 3, 4), 24) == (2, 3, 4)
    assert check_grid(np.array([2, 3, 4])) == (2, 3, 4)
    with pytest.raises(ValueError, match="grid"):
        check_grid((2, 3, 4), 25)
    for bad in [(2, 3), (2, 3, 4, 5), (0, 3, 4), (-1, 3, 4), (2.5, 3, 4), "abc"]:
        with pytest.raises(ValueError, match="grid"):
            check_grid(bad)


def test_bad_order_arguments():
    with pytest.raises(ValueError, match="name"):
        token_order("hilbert4d", (2, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        token_order("raster", (2, 2))
    with pytest.raises(ValueError, match="option"):
        token_order("hilbert3d", (2, 2, 2), box=(2, 2, 2))
    with pytest.raises(ValueError, match="box"):
        token_order("block3d", (2, 2, 2), box=(2, 0, 2))
    with pytest.raises(ValueError, match="box"):
        token_order("block3d", (2, 2, 2), box=(2, 2))
    with pytest.raises(ValueError, match="perm"):
        inverse_permutation(np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="perm"):
        inverse_permutation(np.array([0, 3, 1]))
    with pytest.raises(ValueError, match="perm"):
        inverse_permutation(np.array([0.0, 1.0]))
