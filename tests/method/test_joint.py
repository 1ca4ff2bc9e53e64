"""Joint text + video DFSAttn (docs/spec.md §6.1) against NumPy brute forces of the rule.

The rule: video query blocks keep their top-(k − n_text) video key blocks plus every key block
``≥ vs`` that holds a valid key; query blocks from ``vs`` on attend densely to every valid key;
keys at or past ``kv_lengths[b]`` are never attended. Inputs come from fixed seeds.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_l2

from dfsattn_jax.attention import dense_attention
from dfsattn_jax.cache import cache_layout
from dfsattn_jax.joint import (
    JointTokens,
    joint_attention,
    joint_block_mask,
    joint_density,
    joint_kept_blocks,
    select_joint_blocks,
)
from dfsattn_jax.layout import validate_layout
from dfsattn_jax.schedule import DFSConfig, get_schedule_preset, plan_schedule, reported_sparsity
from dfsattn_jax.scoring import block_scores
from models.common.processor import (
    AttentionHooks,
    AttentionState,
    init_cache,
    make_backend,
    self_attention,
    skipped_fraction,
    sparse_step,
)

# (video tokens, text tokens, block size, valid text per sample): the fixture's two geometries
# (block 3 mixed video+text and block 4 all padding; 32-token blocks with a partly valid block),
# video a multiple of the block (no mixed block) with one sample of no valid text, and text
# shorter than a block.
GEOMETRIES = [
    (420, 128, 128, (38, 9)),
    (420, 64, 32, (38, 9)),
    (384, 40, 128, (40, 0)),
    (200, 20, 32, (3, 20)),
]


def geometry_id(g) -> str:
    return f"Lv{g[0]}-T{g[1]}-b{g[2]}"


def brute_block_mask(scores, num_blocks, joint: JointTokens, block_size, kv_lengths, max_blocks) -> np.ndarray:
    """bool[B, N, nk, nk] of the joint rule by loops (ties to the lower block index)."""
    scores = np.asarray(scores, np.float64)
    batch, heads = scores.shape[:2]
    vs = joint.video_len // block_size
    nk = math.ceil(joint.length / block_size)
    n_text = nk - vs
    k_v = min(max(1, num_blocks - n_text), max_blocks - n_text)
    mask = np.zeros((batch, heads, nk, nk), bool)
    for b in range(batch):
        valid = [v * block_size < kv_lengths[b] for v in range(nk)]
        for n in range(heads):
            for u in range(nk):
                if u >= vs:
                    mask[b, n, u] = valid
                    continue
                best = np.argsort(-scores[b, n, u, :vs], kind="stable")[:k_v]
                mask[b, n, u, best] = True
                for v in range(vs, nk):
                    mask[b, n, u, v] = valid[v]
    return mask


def brute_attention(q, k, v, block_mask, block_size, kv_lengths) -> np.ndarray:
    """float64 attention with the token mask of ``block_mask`` and the key lengths."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    blocks = np.arange(length) // block_size
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(heads):
            allowed = block_mask[b, n][blocks[:, None], blocks[None, :]] & (np.arange(length) < kv_lengths[b])[None]
            logits = q[b, :, n] @ k[b, :, n].T / math.sqrt(dim)
            logits = np.where(allowed, logits, -np.inf)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            out[b, :, n] = (p / p.sum(axis=1, keepdims=True)) @ v[b, :, n]
    return out


def setup(geometry, *, seed=0, heads=2, dim=32, ties=False):
    video, text, block, valid = geometry
    joint = JointTokens(video, text)
    nk = joint.num_blocks(block)
    rng = np.random.default_rng(seed)
    batch = len(valid)
    scores = rng.random((batch, heads, nk, nk)).astype(np.float32)
    if ties:  # integer scores: many ties, broken towards the lower index
        scores = rng.integers(0, 3, (batch, heads, nk, nk)).astype(np.float32)
    kv_lengths = np.asarray([video + t for t in valid], np.int32)
    q, k, v = (rng.standard_normal((batch, joint.length, heads, dim)).astype(np.float32) for _ in range(3))
    return joint, block, scores, kv_lengths, (q, k, v)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_select_joint_blocks_matches_brute_force(geometry, ties):
    joint, block, scores, kv_lengths, _ = setup(geometry, ties=ties)
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    kv = jnp.asarray(kv_lengths)
    for max_blocks in sorted({joint.min_capacity(block), (nk + n_text + 1) // 2, nk}):

        @jax.jit
        def select(num_blocks):  # a traced budget: one program per capacity
            layout = select_joint_blocks(
                jnp.asarray(scores), num_blocks, joint=joint, block_size=block, max_blocks=max_blocks, kv_lengths=kv
            )
            return layout, joint_block_mask(layout, joint=joint, block_size=block, kv_lengths=kv)

        # Budgets below the text blocks (clamped to one video block), in between, and the capacity.
        for num_blocks in sorted({1, n_text, n_text + 1, max_blocks // 2 + 1, max_blocks}):
            layout, got = select(jnp.asarray(num_blocks, jnp.int32))
            validate_layout(layout)
            got = np.asarray(got)
            want = brute_block_mask(scores, num_blocks, joint, block, kv_lengths, max_blocks)
            np.testing.assert_array_equal(got, want, err_msg=f"max_blocks={max_blocks} num_blocks={num_blocks}")
            # The dense rows are not in the layout; padded text blocks are not listed.
            vs = joint.video_blocks(block)
            assert np.all(np.asarray(layout.kv_counts)[:, :, vs:] == 0)
            np.testing.assert_array_equal(np.asarray(layout.to_dense_mask())[:, :, :vs], want[:, :, :vs])


def test_select_joint_blocks_traced_budget_equals_static():
    joint, block, scores, kv_lengths, _ = setup(GEOMETRIES[1], seed=3)
    select = jax.jit(
        lambda s, k: select_joint_blocks(s, k, joint=joint, block_size=block, max_blocks=9, kv_lengths=kv_lengths)
    )
    for num_blocks in (2, 5, 9):
        traced = select(jnp.asarray(scores), jnp.asarray(num_blocks, jnp.int32))
        static = select_joint_blocks(
            jnp.asarray(scores), num_blocks, joint=joint, block_size=block, max_blocks=9, kv_lengths=kv_lengths
        )
        np.testing.assert_array_equal(np.asarray(traced.kv_counts), np.asarray(static.kv_counts))
        np.testing.assert_array_equal(np.asarray(traced.kv_indices), np.asarray(static.kv_indices))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_joint_attention_matches_float64(geometry):
    joint, block, scores, kv_lengths, (q, k, v) = setup(geometry, seed=1)
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    num_blocks = max(n_text + 1, nk // 2)
    layout = select_joint_blocks(
        jnp.asarray(scores), num_blocks, joint=joint, block_size=block, max_blocks=nk, kv_lengths=kv_lengths
    )
    out = joint_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), layout, joint=joint, block_size=block,
        kv_lengths=jnp.asarray(kv_lengths), implementation="xla", dense_implementation="xla",
    )  # fmt: skip
    want = brute_attention(q, k, v, brute_block_mask(scores, num_blocks, joint, block, kv_lengths, nk), block, kv_lengths)
    assert rel_l2(out, want) < 1e-5


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_joint_attention_full_budget_equals_dense(geometry):
    joint, block, scores, kv_lengths, (q, k, v) = setup(geometry, seed=2)
    nk = joint.num_blocks(block)
    layout = select_joint_blocks(
        jnp.asarray(scores), nk, joint=joint, block_size=block, max_blocks=nk, kv_lengths=kv_lengths
    )
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    out = joint_attention(q, k, v, layout, joint=joint, block_size=block, kv_lengths=jnp.asarray(kv_lengths))
    dense = dense_attention(q, k, v, kv_lengths=jnp.asarray(kv_lengths), implementation="xla")
    assert rel_l2(out, dense) < 1e-6


def test_dense_attention_kv_lengths_matches_float64():
    joint, block, _, kv_lengths, (q, k, v) = setup(GEOMETRIES[0], seed=4)
    out = dense_attention(*(jnp.asarray(x) for x in (q, k, v)), kv_lengths=jnp.asarray(kv_lengths))
    nk = joint.num_blocks(block)
    every_block = np.ones((len(kv_lengths), q.shape[2], nk, nk), bool)
    assert rel_l2(out, brute_attention(q, k, v, every_block, block, kv_lengths)) < 1e-6


def padded_changed(x: np.ndarray, kv_lengths: np.ndarray, seed: int) -> np.ndarray:
    """``x`` with every token at or past ``kv_lengths[b]`` replaced by other finite values."""
    rng = np.random.default_rng(seed)
    out = x.copy()
    for b, length in enumerate(kv_lengths):
        out[b, length:] = 3.0 * rng.standard_normal(out[b, length:].shape)
    return out


def run_processor(
    q, k, v, joint, block, kv_lengths, num_blocks, max_blocks, *, tile=8, refresh=True, cache=None, hooks=None
):
    """One layer of ``self_attention`` with the dfs backend at a sparse step (layer 0 of 1)."""
    dfs = dataclasses.replace(get_schedule_preset("hunyuan-video"), block_size=block, tile_size=tile)
    backend = make_backend("dfs", dfs, hooks=hooks)
    if cache is None:
        cache = init_cache(backend, 1, q.shape[0], q.shape[2], joint.length, max_blocks, joint=joint)
    state = AttentionState(control=sparse_step(num_blocks, refresh), cache=cache)
    return self_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend=backend, layer=0, num_layers=1, state=state,
        joint=joint, kv_lengths=jnp.asarray(kv_lengths),
    )  # fmt: skip


def valid_rows(x, kv_lengths) -> list[np.ndarray]:
    return [np.asarray(x)[b, :length] for b, length in enumerate(kv_lengths)]


@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=geometry_id)
def test_processor_refresh_scores_valid_keys_and_selects_the_joint_rule(geometry):
    joint, block, _, kv_lengths, (q, k, v) = setup(geometry, seed=5)
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    num_blocks, max_blocks = n_text + 2, nk - 1
    out, state = run_processor(q, k, v, joint, block, kv_lengths, num_blocks, max_blocks)
    kv = jnp.asarray(kv_lengths)
    scores = block_scores(jnp.asarray(q), jnp.asarray(k), tile_size=8, block_size=block, kv_lengths=kv)
    want_mask = brute_block_mask(scores, num_blocks, joint, block, kv_lengths, max_blocks)
    cached = cache_layout(state.cache, 0, nk)
    validate_layout(cached)
    np.testing.assert_array_equal(np.asarray(joint_block_mask(cached, joint=joint, block_size=block, kv_lengths=kv)), want_mask)
    assert rel_l2(out, brute_attention(q, k, v, want_mask, block, kv_lengths)) < 1e-5
    # Skipped fraction as the reference counts it: text blocks always on, dense rows full.
    expected = 1.0 - joint_density(num_blocks, joint, block)
    assert float(skipped_fraction(state.cache, 1, joint=joint, block_size=block)) == pytest.approx(expected, rel=1e-6)


def test_processor_full_budget_equals_dense():
    joint, block, _, kv_lengths, (q, k, v) = setup(GEOMETRIES[1], seed=6)
    nk = joint.num_blocks(block)
    out, _ = run_processor(q, k, v, joint, block, kv_lengths, nk, nk)
    dense = dense_attention(*(jnp.asarray(x) for x in (q, k, v)), kv_lengths=jnp.asarray(kv_lengths))
    assert rel_l2(out, dense) < 1e-6


class _WholeLayer(AttentionHooks):
    """Keeps every layer whole, as the quality runner's always-dense layers do."""

    def layer_blocks(self, num_blocks, *, layer, inputs, step, num_key_blocks):
        return jnp.int32(num_key_blocks)


def test_hook_keeps_a_joint_layer_whole():
    """The layer_blocks hook's num_key_blocks counts the joint blocks (text included), so a hooked
    layer at a small budget attends every valid key: it equals dense attention with key lengths."""
    joint, block, _, kv_lengths, (q, k, v) = setup(GEOMETRIES[1], seed=6)
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    out, state = run_processor(q, k, v, joint, block, kv_lengths, n_text + 1, nk, hooks=_WholeLayer())
    dense = dense_attention(*(jnp.asarray(x) for x in (q, k, v)), kv_lengths=jnp.asarray(kv_lengths))
    assert rel_l2(out, dense) < 1e-6
    assert float(skipped_fraction(state.cache, 1, joint=joint, block_size=block)) == pytest.approx(0.0, abs=1e-7)
    # Without the hook the same budget skips blocks.
    sparse, _ = run_processor(q, k, v, joint, block, kv_lengths, n_text + 1, nk)
    assert rel_l2(sparse, dense) > 1e-3


def test_padded_text_changes_nothing():
    """Other values in the padded text (q, k and v) leave the layout and every valid row's output
    bit-identical, at a refresh and at a cached step."""
    joint, block, _, kv_lengths, (q, k, v) = setup(GEOMETRIES[1], seed=7)
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    first, state = run_processor(q, k, v, joint, block, kv_lengths, n_text + 3, nk - 2)
    q2, k2, v2 = (padded_changed(x, kv_lengths, seed) for seed, x in enumerate((q, k, v)))
    second, state2 = run_processor(q2, k2, v2, joint, block, kv_lengths, n_text + 3, nk - 2)
    np.testing.assert_array_equal(np.asarray(state.cache.kv_counts), np.asarray(state2.cache.kv_counts))
    np.testing.assert_array_equal(np.asarray(state.cache.kv_indices), np.asarray(state2.cache.kv_indices))
    for a, b in zip(valid_rows(first, kv_lengths), valid_rows(second, kv_lengths)):
        np.testing.assert_array_equal(a, b)
    reused, _ = run_processor(q2, k2, v2, joint, block, kv_lengths, 1, nk - 2, refresh=False, cache=state.cache)
    for a, b in zip(valid_rows(first, kv_lengths), valid_rows(reused, kv_lengths)):
        np.testing.assert_array_equal(a, b)


def test_kept_blocks_count_as_the_reference():
    joint, block, scores, kv_lengths, _ = setup(GEOMETRIES[1], seed=8)
    nk, vs, n_text = joint.num_blocks(block), joint.video_blocks(block), joint.text_blocks(block)
    for num_blocks in (1, 5, 9, nk):
        layout = select_joint_blocks(
            jnp.asarray(scores), num_blocks, joint=joint, block_size=block, max_blocks=nk, kv_lengths=kv_lengths
        )
        kept = np.asarray(joint_kept_blocks(layout.kv_indices, layout.kv_counts, joint=joint, block_size=block))
        mask = brute_block_mask(scores, num_blocks, joint, block, kv_lengths, nk)
        # The reference's mask: the video rows' video blocks, all n_text text columns, full dense rows.
        ref = mask.copy()
        ref[:, :, :vs, vs:] = True
        ref[:, :, vs:, :] = True
        np.testing.assert_allclose(kept, ref.sum(-1).mean(-1), rtol=1e-6)
        assert kept.mean() / nk == pytest.approx(joint_density(num_blocks, joint, block), rel=1e-6)


def test_hunyuan_720p_budgets_and_reported_sparsity():
    joint = JointTokens(33 * 45 * 80, 256)
    assert (joint.video_blocks(128), joint.num_blocks(128), joint.text_blocks(128)) == (928, 931, 3)
    plan = plan_schedule(get_schedule_preset("hunyuan-video"), 50, joint.num_blocks(128))
    assert plan.refresh_steps == (12, 24, 36)
    assert [int(plan.num_blocks[s]) for s in (12, 24, 36, 49)] == [279, 186, 93, 93]
    assert [round(joint_density(k, joint, 128), 4) for k in (279, 186, 93)] == [0.3019, 0.2024, 0.1028]
    assert reported_sparsity(plan, 60, (), joint=joint) == pytest.approx(
        1 - (12 * joint_density(279, joint, 128) + 12 * joint_density(186, joint, 128) + 14 * joint_density(93, joint, 128)) / 38
    )
    assert round(reported_sparsity(plan, 60, (), joint=joint), 4) == 0.8029


IMPLEMENTATIONS = ["triton"] + (["mosaic_gpu"] if sys.version_info >= (3, 12) else [])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kernels_run_the_joint_layout(implementation):
    """Both Pallas kernels (interpreter) take the joint layout with kv_lengths: the dense rows'
    count 0 and the padded text blocks, equal to the XLA path. Mosaic: 128-token blocks, bf16,
    L a multiple of 8."""
    if implementation == "mosaic_gpu":
        from pallas_kernels.block_sparse_mosaic import unsupported

        rng = np.random.default_rng(9)
        why = unsupported(jnp.zeros((1, 8, 1, 64), jnp.bfloat16), 128)
        if why is not None:
            pytest.skip(f"Mosaic GPU kernel unavailable here: {why}")
        joint, block, dtype, dim = JointTokens(416, 128), 128, jnp.bfloat16, 64
        kv_lengths = np.asarray([416 + 38, 416 + 9], np.int32)
        scores = rng.random((2, 2, 5, 5)).astype(np.float32)
        q, k, v = (rng.standard_normal((2, joint.length, 2, dim)).astype(np.float32) for _ in range(3))
        tol = 2e-2
    else:
        joint, block, scores, kv_lengths, (q, k, v) = setup(GEOMETRIES[0], seed=9)
        dtype, tol = jnp.float32, 1e-5
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    layout = select_joint_blocks(
        jnp.asarray(scores), n_text + 2, joint=joint, block_size=block, max_blocks=nk, kv_lengths=kv_lengths
    )
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    kwargs = dict(joint=joint, block_size=block, kv_lengths=jnp.asarray(kv_lengths), dense_implementation="xla")
    got = joint_attention(*args, layout, implementation=implementation, interpret=True, **kwargs)
    want = joint_attention(*(a.astype(jnp.float32) for a in args), layout, implementation="xla", **kwargs)
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert rel_l2(got, want) < tol


def test_errors_name_the_argument():
    joint, block, scores, kv_lengths, (q, k, v) = setup(GEOMETRIES[1])
    nk, n_text = joint.num_blocks(block), joint.text_blocks(block)
    with pytest.raises(ValueError, match="max_blocks must be in"):
        select_joint_blocks(jnp.asarray(scores), 3, joint=joint, block_size=block, max_blocks=n_text)
    with pytest.raises(ValueError, match="scores must have shape"):
        select_joint_blocks(jnp.asarray(scores[:, :, :, :-1]), 3, joint=joint, block_size=block, max_blocks=nk)
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        select_joint_blocks(jnp.asarray(scores), 0, joint=joint, block_size=block, max_blocks=nk)
    with pytest.raises(ValueError, match="kv_lengths must lie in"):
        select_joint_blocks(
            jnp.asarray(scores), 3, joint=joint, block_size=block, max_blocks=nk, kv_lengths=np.asarray([1, 999], np.int32)
        )
    with pytest.raises(ValueError, match="spans 483 tokens"):
        JointTokens(420, 63).check(484)
    with pytest.raises(ValueError, match="video_len must be >= 1"):
        JointTokens(0, 64).check()
    with pytest.raises(ValueError, match="text_len must be a non-negative integer"):
        JointTokens(420, 6.5).check()
    with pytest.raises(ValueError, match="spans 483 tokens"):
        self_attention(
            *(jnp.asarray(x) for x in (q, k, v)), backend=make_backend("dense"), layer=0, num_layers=1,
            state=AttentionState(), joint=JointTokens(420, 63),
        )  # fmt: skip
    backend = make_backend("dfs", dataclasses.replace(get_schedule_preset("hunyuan-video"), block_size=block))
    with pytest.raises(ValueError, match=r"max_blocks must be in \[4, 16\].*every text block"):
        init_cache(backend, 1, 2, 2, joint.length, 3, joint=joint)
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \[B=2\]"):
        dense_attention(*(jnp.asarray(x) for x in (q, k, v)), kv_lengths=jnp.asarray([3], jnp.int32))


def test_check_capacity_bounds():
    # 420 video + 64 text tokens at block 32: nk = 16, vs = 13, n_text = 3, so K_max in [4, 16].
    joint = JointTokens(420, 64)
    assert (joint.min_capacity(32), joint.num_blocks(32)) == (4, 16)
    for ok in (4, np.int32(9), 16):
        got = joint.check_capacity(ok, 32)
        assert type(got) is int and got == int(ok)
    for bad in (3, 17):
        with pytest.raises(ValueError, match=rf"max_blocks must be in \[4, 16\].*every text block.*got {bad}"):
            joint.check_capacity(bad, 32)
    for bad in (4.0, True):
        with pytest.raises(ValueError, match="max_blocks must be a positive integer"):
            joint.check_capacity(bad, 32)


def test_init_cache_capacity_is_an_integer_on_both_paths():
    backend = make_backend("dfs", DFSConfig(block_size=32, tile_size=8, dense_layers=()))
    joint = JointTokens(420, 64)
    for kwargs, length in (({}, 420), ({"joint": joint}, joint.length)):
        cache = init_cache(backend, 2, 1, 2, length, np.int64(5), **kwargs)
        assert cache is not None and cache.kv_indices.shape[-1] == 5
        for bad in (5.0, True, 0):
            with pytest.raises(ValueError, match="max_blocks must be"):
                init_cache(backend, 2, 1, 2, length, bad, **kwargs)
    with pytest.raises(ValueError, match=r"max_blocks must be in \[1, 14\] \(key blocks of 420 tokens\), got 15"):
        init_cache(backend, 2, 1, 2, 420, 15)


ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiled GPU paths (JAX_PLATFORMS=cuda)")


@gpu_only
def test_compiled_dense_attention_kv_lengths_cudnn_equals_xla():
    """cuDNN and XLA both honour key_value_seq_lengths, and agree (bf16 inputs)."""
    rng = np.random.default_rng(20)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2256, 4, 128)), jnp.bfloat16) for _ in range(3))
    kv_lengths = jnp.asarray([2030, 2200], jnp.int32)
    cudnn = dense_attention(q, k, v, kv_lengths=kv_lengths, implementation="cudnn")
    xla = dense_attention(q, k, v, kv_lengths=kv_lengths, implementation="xla")
    want = brute_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                           np.ones((2, 4, 18, 18), bool), 128, np.asarray(kv_lengths))  # fmt: skip
    assert rel_l2(cudnn, want) < 1e-2 and rel_l2(xla, want) < 1e-2
    assert rel_l2(cudnn, xla) < 1e-2


@gpu_only
@pytest.mark.parametrize("implementation", ["triton", "mosaic_gpu"], ids=lambda i: f"compiled-{i}")
def test_compiled_kernels_run_the_joint_layout(implementation):
    joint, block = JointTokens(2000, 256), 128
    rng = np.random.default_rng(21)
    nk = joint.num_blocks(block)
    scores = rng.random((2, 4, nk, nk)).astype(np.float32)
    kv_lengths = jnp.asarray([2030, 2200], jnp.int32)
    layout = select_joint_blocks(jnp.asarray(scores), 8, joint=joint, block_size=block, max_blocks=10, kv_lengths=kv_lengths)
    q, k, v = (jnp.asarray(rng.standard_normal((2, joint.length, 4, 128)), jnp.bfloat16) for _ in range(3))
    kwargs = dict(joint=joint, block_size=block, kv_lengths=kv_lengths)
    got = jax.jit(lambda q, k, v: joint_attention(q, k, v, layout, implementation=implementation, **kwargs))(q, k, v)
    mask = brute_block_mask(scores, 8, joint, block, np.asarray(kv_lengths), 10)
    want = brute_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, block,
                           np.asarray(kv_lengths))  # fmt: skip
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert rel_l2(got, want) < 1e-2
