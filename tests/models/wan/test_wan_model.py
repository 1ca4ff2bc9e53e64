"""Tests of the Flax NNX Wan2.1 model and its dense / DFS self-attention (CPU, tiny config).

The model is checked against an independent float64 NumPy forward written from diffusers'
``WanTransformer3DModel`` (Conv3d patch embedding with torch's weight layout, complex RoPE,
``flatten(2).transpose(1, 2)`` tokens, the ``permute(0, 7, 1, 4, 2, 5, 3, 6)`` unpatchify). Its
self-attention is a hook, so the same reference also checks DFS: tokens permuted into
hilbert3d order, layouts from ``block_scores``/``select_blocks`` on the permuted q/k, masked
softmax, permuted back.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfsattn_jax.cache import cache_layout
from dfsattn_jax.layout import select_blocks
from dfsattn_jax.orders import token_order
from dfsattn_jax.schedule import DFSConfig
from dfsattn_jax.scoring import block_scores
from models.wan import config as configs
from models.common.processor import (
    AttentionBackend,
    dense_step,
    init_cache,
    make_backend,
    num_token_blocks,
    sparse_step,
)
from models.wan.config import get_config, latent_shape
from models.common.rope import rope_axis_dims
from models.wan.transformer import WanTransformer3DModel

CFG = get_config("tiny")
LATENT = (16, 3, 8, 12)  # C, F, H, W -> token grid 3 x 4 x 6 = 72 tokens
GRID = (3, 4, 6)
L = 72
DFS = DFSConfig(block_size=16, tile_size=4, dense_layers=(0,))  # 5 blocks, the last one partial
NK = num_token_blocks(L, DFS.block_size)
TEXT_LEN = 7
# float32 model vs float64 reference through 2 blocks: observed <= 1e-6 (float32 eps 1.2e-7
# times O(10) roundings per output); 1e-5 leaves margin for summation-order differences while
# any real mistake (wrong order, missing term) shows as O(1e-2) or more.
F32_TOL = 1e-5


def _randomize(model: nnx.Module, seed: int) -> None:
    """Perturbs every parameter (so norm weights are not ones and biases not zero)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    new = [
        jnp.asarray(np.asarray(x, np.float32) + 0.1 * rng.standard_normal(x.shape, np.float32), x.dtype)
        for x in leaves
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    m = WanTransformer3DModel("tiny", rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    _randomize(m, 1)
    return m


@pytest.fixture(scope="module")
def dense_fwd(model):
    return _jit(model)


@pytest.fixture(scope="module")
def dfs_fwd(model):
    return _jit(model, AttentionBackend("dfs", DFS))


def _jit(model: nnx.Module, backend="dense"):
    """The model's forward as one jitted function of (x, t, text, control, cache)."""
    graphdef, state = nnx.split(model)
    backend = make_backend(backend)

    @jax.jit
    def forward(state, x, t, text, control, cache):
        return nnx.merge(graphdef, state)(x, t, text, backend=backend, control=control, cache=cache)

    return lambda x, t, text, control=None, cache=None: forward(state, x, t, text, control, cache)


def _inputs(seed: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *LATENT), np.float32))
    t = jnp.asarray(rng.integers(0, 1000, (batch,)).astype(np.float32))
    text = jnp.asarray(rng.standard_normal((batch, TEXT_LEN, CFG.text_dim), np.float32))
    return x, t, text


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- NumPy reference


def _params(model) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _lin(p, x):
    return x @ p["kernel"] + p["bias"]


def _ln(x, p=None, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y if p is None else y * p["weight"] + p["bias"]


def _rms(x, p, eps=1e-6):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["weight"]


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax_attention(q, k, v, mask=None):
    """q [B, L, N, D], k/v [B, T, N, D], mask [B, N, L, T] or None."""
    logits = np.einsum("blnd,btnd->bnlt", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bnlt,btnd->blnd", w, v)


def _rope_complex(grid, head_dim, theta=10000.0):
    """Per-token complex rotations [L, D/2], raster order (diffusers' get_1d_rotary_pos_embed)."""
    parts = []
    for axis, d in enumerate(rope_axis_dims(head_dim)):
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        parts.append(np.exp(1j * np.outer(np.arange(grid[axis]), inv)))
    f, h, w = np.meshgrid(*(np.arange(g) for g in grid), indexing="ij")
    return np.concatenate([parts[0][f.ravel()], parts[1][h.ravel()], parts[2][w.ravel()]], axis=-1)


def _apply_rope(x, rot):
    xc = (x[..., 0::2] + 1j * x[..., 1::2]) * rot[None, :, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = xc.real
    out[..., 1::2] = xc.imag
    return out


def reference_forward(model, x, t, text, attend=None):
    """float64 Wan forward; ``attend(layer, q, k, v)`` (raster order) replaces self-attention."""
    cfg = model.config
    p = _params(model)
    x, t, text = (np.asarray(a, np.float64) for a in (x, t, text))
    b, c, f, h, w = x.shape
    pt, ph, pw = cfg.patch_size
    heads, hd = cfg.num_heads, cfg.head_dim
    # Conv3d with torch's weight layout [dim, C, pt, ph, pw].
    weight = p["patch_embedding"]["kernel"].transpose(4, 3, 0, 1, 2)
    xr = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    y = np.einsum("ocapq,bcfahpwq->bofhw", weight, xr) + p["patch_embedding"]["bias"][None, :, None, None, None]
    grid = y.shape[2:]
    hs = y.reshape(b, cfg.dim, -1).transpose(0, 2, 1)
    # Timestep embedding: [sin, cos] flipped to [cos, sin].
    half = cfg.freq_dim // 2
    args = t[:, None] * np.exp(-math.log(10000.0) * np.arange(half) / half)[None]
    emb = np.concatenate([np.sin(args), np.cos(args)], -1)
    emb = np.concatenate([emb[:, half:], emb[:, :half]], -1)
    ce = p["condition_embedder"]
    temb = _lin(ce["time_embedder"]["linear_2"], _silu(_lin(ce["time_embedder"]["linear_1"], emb)))
    tproj = _lin(ce["time_proj"], _silu(temb)).reshape(b, 6, cfg.dim)
    txt = _lin(ce["text_embedder"]["linear_2"], _gelu_tanh(_lin(ce["text_embedder"]["linear_1"], text)))
    rot = _rope_complex(grid, hd)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, hd)  # noqa: E731
    for i in range(cfg.num_layers):
        bp = p["blocks"][i]
        sh, sc, g, csh, csc, cg = np.split(bp["scale_shift_table"] + tproj, 6, axis=1)
        n = _ln(hs) * (1 + sc) + sh
        a1 = bp["attn1"]
        q = _apply_rope(split(_rms(_lin(a1["to_q"], n), a1["norm_q"])), rot)
        k = _apply_rope(split(_rms(_lin(a1["to_k"], n), a1["norm_k"])), rot)
        v = split(_lin(a1["to_v"], n))
        o = attend(i, q, k, v) if attend is not None else _softmax_attention(q, k, v)
        hs = hs + _lin(a1["to_out"][0], o.reshape(b, -1, cfg.dim)) * g
        n = _ln(hs, bp["norm2"])
        a2 = bp["attn2"]
        q = split(_rms(_lin(a2["to_q"], n), a2["norm_q"]))
        k = split(_rms(_lin(a2["to_k"], txt), a2["norm_k"]))
        v = split(_lin(a2["to_v"], txt))
        hs = hs + _lin(a2["to_out"][0], _softmax_attention(q, k, v).reshape(b, -1, cfg.dim))
        n = _ln(hs) * (1 + csc) + csh
        ff = bp["ffn"]["net"]
        hs = hs + _lin(ff[2], _gelu_tanh(_lin(ff[0]["proj"], n))) * cg
    shift, scale = np.split(p["scale_shift_table"] + temb[:, None], 2, axis=1)
    hs = _lin(p["proj_out"], _ln(hs) * (1 + scale) + shift)
    hs = hs.reshape(b, *grid, pt, ph, pw, -1).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return hs.reshape(b, -1, f, h, w)


class DFSReference:
    """Reference DFS self-attention: permute, score, select (refresh) or reuse, mask, restore."""

    def __init__(self, dfs: DFSConfig, grid, num_blocks: int, refresh: bool, layouts=None, scoring=None):
        self.dfs = dfs
        self.scoring = scoring  # block_scores' implementation (a Pallas one runs interpreted)
        self.perm = np.asarray(token_order(dfs.order, grid))
        self.num_blocks = num_blocks
        self.refresh = refresh
        self.layouts = {} if layouts is None else layouts

    def __call__(self, layer, q, k, v):
        if layer in self.dfs.dense_layers:
            return _softmax_attention(q, k, v)
        qp, kp, vp = (a[:, self.perm] for a in (q, k, v))
        if self.refresh:
            scores = block_scores(jnp.asarray(qp, jnp.float32), jnp.asarray(kp, jnp.float32),
                                  tile_size=self.dfs.tile_size, block_size=self.dfs.block_size,
                                  implementation=self.scoring, interpret=True)
            self.layouts[layer] = np.asarray(select_blocks(scores, self.num_blocks).to_dense_mask())
        blocks = self.layouts[layer]  # [B, N, nq, nk]
        tok = np.arange(q.shape[1]) // self.dfs.block_size
        mask = blocks[:, :, tok][:, :, :, tok]  # [B, N, L, L]
        o = _softmax_attention(qp, kp, vp, mask)
        out = np.empty_like(o)
        out[:, self.perm] = o
        return out


# --------------------------------------------------------------------------- tests


def test_parameter_names_mirror_diffusers(model):
    flat = {
        ".".join(str(k) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        for path in [[getattr(p, "key", getattr(p, "idx", p)) for p in path]]
    }
    d, ffn, cin = CFG.dim, CFG.ffn_dim, CFG.in_channels
    expected = {
        "patch_embedding.kernel": (1, 2, 2, cin, d),
        "patch_embedding.bias": (d,),
        "condition_embedder.time_embedder.linear_1.kernel": (CFG.freq_dim, d),
        "condition_embedder.time_embedder.linear_2.kernel": (d, d),
        "condition_embedder.time_proj.kernel": (d, 6 * d),
        "condition_embedder.text_embedder.linear_1.kernel": (CFG.text_dim, d),
        "condition_embedder.text_embedder.linear_2.kernel": (d, d),
        "proj_out.kernel": (d, CFG.out_channels * 4),
        "scale_shift_table": (1, 2, d),
    }
    for i in range(CFG.num_layers):
        blk = f"blocks.{i}."
        for attn in ("attn1", "attn2"):
            for lin in ("to_q", "to_k", "to_v", "to_out.0"):
                expected[f"{blk}{attn}.{lin}.kernel"] = (d, d)
                expected[f"{blk}{attn}.{lin}.bias"] = (d,)
            expected[f"{blk}{attn}.norm_q.weight"] = (d,)
            expected[f"{blk}{attn}.norm_k.weight"] = (d,)
        expected[f"{blk}norm2.weight"] = (d,)
        expected[f"{blk}norm2.bias"] = (d,)
        expected[f"{blk}ffn.net.0.proj.kernel"] = (d, ffn)
        expected[f"{blk}ffn.net.0.proj.bias"] = (ffn,)
        expected[f"{blk}ffn.net.2.kernel"] = (ffn, d)
        expected[f"{blk}ffn.net.2.bias"] = (d,)
        expected[f"{blk}scale_shift_table"] = (1, 6, d)
    for name in ("condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                 "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
                 "condition_embedder.text_embedder.linear_2", "proj_out"):
        expected[f"{name}.bias"] = (expected[f"{name}.kernel"][1],)
    assert flat == expected


def test_forward_shapes_and_matches_float64_reference(model, dense_fwd):
    x, t, text = _inputs(0)
    out, cache = dense_fwd(x, t, text)
    assert cache is None
    chex.assert_shape(out, (2, CFG.out_channels, *LATENT[1:]))
    assert out.dtype == jnp.float32
    ref = reference_forward(model, x, t, text)
    assert _rel(out, ref) < F32_TOL


def test_scalar_timestep_broadcasts(dense_fwd):
    x, t, text = _inputs(1)
    forward = dense_fwd
    out_vec, _ = forward(x, jnp.full((2,), t[0]), text)
    out_scalar, _ = forward(x, t[0], text)
    np.testing.assert_array_equal(np.asarray(out_vec), np.asarray(out_scalar))


@pytest.mark.parametrize("order", ["hilbert3d", "morton3d"])
def test_dense_with_and_without_permutation_agree(model, dense_fwd, order):
    x, t, text = _inputs(2)
    plain, _ = dense_fwd(x, t, text)
    permuted, _ = _jit(model, make_backend("dense", order=order))(x, t, text)
    assert _rel(permuted, plain) < F32_TOL


def test_dfs_at_density_one_equals_dense(dense_fwd, dfs_fwd):
    x, t, text = _inputs(3)
    dense, _ = dense_fwd(x, t, text)
    backend = AttentionBackend("dfs", DFS)
    cache = init_cache(backend, CFG.num_layers, 2, CFG.num_heads, L, NK)
    out, cache = dfs_fwd(x, t, text, sparse_step(NK), cache)
    assert _rel(out, dense) < F32_TOL
    assert int(cache.refreshes) == len(backend.sparse_layers(CFG.num_layers))


def test_dfs_dense_step_is_dense_and_keeps_cache(dense_fwd, dfs_fwd):
    x, t, text = _inputs(4)
    backend = AttentionBackend("dfs", DFS)
    cache = init_cache(backend, CFG.num_layers, 2, CFG.num_heads, L, 3)
    dense, _ = dense_fwd(x, t, text)
    out, new_cache = dfs_fwd(x, t, text, dense_step(), cache)
    assert _rel(out, dense) < F32_TOL
    chex.assert_trees_all_equal(new_cache, cache)


def test_dfs_refresh_then_reuse_matches_reference(model, dfs_fwd):
    """Refresh at one input, reuse the cached layouts at another; both against the reference."""
    num_blocks = 2
    backend = AttentionBackend("dfs", DFS)
    cache = init_cache(backend, CFG.num_layers, 2, CFG.num_heads, L, 3)
    step = dfs_fwd

    x, t, text = _inputs(6)
    out, cache = step(x, t, text, sparse_step(num_blocks, refresh=True), cache)
    ref_attn = DFSReference(DFS, GRID, num_blocks, refresh=True)
    ref = reference_forward(model, x, t, text, attend=ref_attn)
    assert _rel(out, ref) < F32_TOL
    # The cache holds the layout the reference selected (per sample, per head).
    for layer, blocks in ref_attn.layouts.items():
        slot = backend.slot(layer, CFG.num_layers)
        np.testing.assert_array_equal(np.asarray(cache_layout(cache, slot, NK).to_dense_mask()), blocks)
    assert int(cache.refreshes) == 1
    # Sparse attention really drops mass: the output differs from dense.
    assert _rel(out, reference_forward(model, x, t, text)) > 1e-3

    x2, t2, text2 = _inputs(7)
    out2, cache2 = step(x2, t2, text2, sparse_step(1, refresh=False), cache)
    reuse = DFSReference(DFS, GRID, num_blocks, refresh=False, layouts=ref_attn.layouts)
    assert _rel(out2, reference_forward(model, x2, t2, text2, attend=reuse)) < F32_TOL
    chex.assert_trees_all_equal(cache2, cache)


@pytest.mark.parametrize("scoring", ["jnp", "triton"])
def test_backend_scoring_implementation_scores_the_refresh(model, scoring, monkeypatch):
    """``scoring_implementation`` reaches ``block_scores`` at a refresh: the forward asks for that
    scorer, and its output and cached layouts match the reference scoring with the same scorer
    (the Triton kernel in the Pallas interpreter, as the backend's ``interpret`` asks)."""
    from models.common import processor

    asked = []

    def spy(*args, **kwargs):
        asked.append((kwargs.get("implementation"), kwargs.get("interpret")))
        return block_scores(*args, **kwargs)

    monkeypatch.setattr(processor, "block_scores", spy)
    backend = make_backend("dfs", DFS, scoring_implementation=scoring, interpret=True)
    assert backend.scoring_implementation == scoring
    num_blocks = 2
    cache = init_cache(backend, CFG.num_layers, 2, CFG.num_heads, L, 3)
    x, t, text = _inputs(11)
    out, cache = _jit(model, backend)(x, t, text, sparse_step(num_blocks), cache)
    assert asked == [(scoring, True)] * len(backend.sparse_layers(CFG.num_layers))
    ref_attn = DFSReference(DFS, GRID, num_blocks, refresh=True, scoring=scoring)
    assert _rel(out, reference_forward(model, x, t, text, attend=ref_attn)) < F32_TOL
    for layer, blocks in ref_attn.layouts.items():
        slot = backend.slot(layer, CFG.num_layers)
        np.testing.assert_array_equal(np.asarray(cache_layout(cache, slot, NK).to_dense_mask()), blocks)


@pytest.mark.parametrize(
    "field, message",
    [
        ("scoring_implementation", r"scoring_implementation must be one of \('triton', 'jnp'\) or None, got 'cuda'"),
        ("sparse_implementation", r"sparse_implementation must be one of \('mosaic_gpu', 'triton', 'xla'\) or None, got 'cuda'"),
        ("dense_implementation", r"dense_implementation must be one of \('cudnn', 'xla'\) or None, got 'cuda'"),
    ],
)
def test_backend_rejects_unknown_implementations(field, message):
    """Every implementation name is checked once, when the backend is built (not at the first layer)."""
    with pytest.raises(ValueError, match=message):
        AttentionBackend("dfs", DFS, **{field: "cuda"})
    with pytest.raises(ValueError, match=message):
        make_backend("dfs", DFS, **{field: "cuda"})


def test_bfloat16_model_runs_and_keeps_float32_modules(model):
    m16 = WanTransformer3DModel("tiny", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = nnx.to_pure_dict(nnx.state(m16, nnx.Param))
    assert params["blocks"][0]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
    assert params["blocks"][0]["scale_shift_table"].dtype == jnp.float32
    assert params["blocks"][0]["norm2"]["weight"].dtype == jnp.float32
    assert params["scale_shift_table"].dtype == jnp.float32
    assert params["condition_embedder"]["time_embedder"]["linear_1"]["kernel"].dtype == jnp.float32
    # Same weights in both: the float32 fixture's, rounded to the bf16 model's parameter dtypes.
    cast = jax.tree.map(lambda a, b: a.astype(b.dtype), nnx.state(model, nnx.Param), nnx.state(m16, nnx.Param))
    nnx.update(m16, cast)
    x, t, text = _inputs(8)
    out16, _ = _jit(m16)(x, t, text)
    out32 = reference_forward(m16, x, t, text)
    assert out16.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (relative step 2**-8 ~ 4e-3); observed ~6e-3 through two blocks.
    assert _rel(out16.astype(jnp.float32), out32) < 2e-2


def test_latent_shape_and_token_counts():
    assert latent_shape("wan2.1-1.3b", 81, 480, 832) == (16, 21, 60, 104)
    assert configs.token_grid("wan2.1-1.3b", (21, 60, 104)) == (21, 30, 52)
    assert math.prod(configs.token_grid("wan2.1-14b", latent_shape("wan2.1-14b", 81, 720, 1280)[1:])) == 75600
    cfg = get_config("wan2.1-14b")
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.head_dim) == (5120, 40, 40, 13824, 128)


def test_bad_inputs_raise(model):
    x, t, text = _inputs(9)
    with pytest.raises(ValueError, match="hidden_states"):
        model(x[:, :, :, :7], t, text)  # H = 7 not divisible by the patch 2
    with pytest.raises(ValueError, match="hidden_states"):
        model(x[:, :8], t, text)  # wrong channels
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, text[..., :-1])  # wrong text dim
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, text[:1])  # batch mismatch
    with pytest.raises(ValueError, match="timestep"):
        model(x, jnp.zeros((3,)), text)
    with pytest.raises(ValueError, match="config"):
        get_config("wan3-huge")
    with pytest.raises(ValueError, match="config"):
        WanTransformer3DModel("nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="backend"):
        make_backend("flash")
    with pytest.raises(ValueError, match="cache"):
        model(x, t, text, backend=AttentionBackend("dfs", DFS), control=sparse_step(2))
    with pytest.raises(ValueError, match="frames"):
        latent_shape("tiny", 10, 64, 64)
    with pytest.raises(ValueError, match="height"):
        latent_shape("tiny", 9, 72, 64)
    with pytest.raises(ValueError, match="dense_layers"):
        AttentionBackend("dfs", DFSConfig(dense_layers=(5,))).sparse_layers(CFG.num_layers)
