"""The UMT5 encoder (models.text_encoders.umt5) against transformers' ``UMT5EncoderModel``.

The fixture ``tests/fixtures/umt5_tiny`` was made by ``tests/fixtures/make_umt5_fixture.py`` with
transformers' ``UMT5EncoderModel`` (random weights, float32, eager attention; versions in its
metadata.json): a two-shard ``text_encoder/`` folder plus transformers' outputs for fixed prompts.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from helpers import FIXTURES, rel_l2

from models.common.checkpoint import expected_tensors
from models.text_encoders.umt5 import (
    CONFIGS,
    UMT5Config,
    UMT5EncoderModel,
    get_config,
    relative_position_bucket,
    relative_position_buckets,
)
from models.text_encoders.umt5_loading import load_umt5

FIXTURE = FIXTURES / "umt5_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
# float32 end to end; transformers (eager attention) and XLA differ in summation order only:
# observed ~4e-7 relative L2; the bound is 1e-5.
RTOL = 1e-5
# bfloat16 parameters and activations (norms, logits and softmax in float32): each bf16 rounding
# has a relative error of at most u = 2**-9 (about u / sqrt(3) on average). A tiny block rounds
# about 10 times on the residual path (7 matrix products on rounded weights and inputs, 2 norm
# outputs, the residual adds); over 3 blocks, 30 roundings adding as a random walk give
# sqrt(30) * u / sqrt(3) ~ 3.2 u, which the softmax and the gated GELU amplify by a small factor.
# Observed 4.8 u (9.3e-3); the bound is 8 u. The floor u / 4 shows that bf16 really ran.
BF16_U = 2.0**-9
BF16_RTOL = 8 * BF16_U


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def model() -> UMT5EncoderModel:
    return load_umt5(FIXTURE, dtype=jnp.float32)


def _valid_rows(out, ref, lengths) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the prompts' tokens (``</s>`` included), concatenated over the batch."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref)
    return (np.concatenate([out[b, :n] for b, n in enumerate(lengths)]),
            np.concatenate([ref[b, :n] for b, n in enumerate(lengths)]))  # fmt: skip


# ------------------------------------------------------------------ equivalence with transformers


def test_fixture_is_what_the_test_assumes(io):
    lengths = META["prompt_lengths"]["a"]
    mask = io["a/attention_mask"]
    assert mask.shape == (2, META["lengths"]["a"]) and list(mask.sum(axis=1)) == lengths
    assert max(lengths) > META["model_config"]["relative_attention_max_distance"]  # saturated bucket
    assert io["a/input_ids"].dtype == np.int32 and np.all(io["a/input_ids"][mask == 0] == 0)
    assert float(np.abs(io["a/last_hidden_state"]).mean()) > 0.1  # not zeros


def test_matches_transformers_two_prompt_lengths_with_mask(model, io):
    """Batch 2, L = 160, prompts of 37 and 150 tokens (150 > 128: the saturated bucket)."""
    out = jax.jit(lambda ids, mask: model(ids, mask))(io["a/input_ids"], io["a/attention_mask"])
    assert out.shape == (2, 160, 64) and out.dtype == jnp.float32
    lengths = META["prompt_lengths"]["a"]
    for b, n in enumerate(lengths):
        err = rel_l2(np.asarray(out)[b, :n], io["a/last_hidden_state"][b, :n])
        assert err <= RTOL, f"prompt {b} ({n} tokens): relative L2 {err:.2e}"
    err = rel_l2(*_valid_rows(out, io["a/last_hidden_state"], lengths))
    assert err <= RTOL, f"valid rows: relative L2 {err:.2e}"
    # The padded query rows are computed as transformers computes them as well.
    assert rel_l2(out, io["a/last_hidden_state"]) <= RTOL


def test_matches_transformers_without_mask(model, io):
    """``attention_mask=None`` (every token valid), another length (20)."""
    out = model(io["b/input_ids"])
    err = rel_l2(out, io["b/last_hidden_state"])
    assert err <= RTOL, f"relative L2 {err:.2e}"
    ones = model(io["b/input_ids"], np.ones(io["b/input_ids"].shape, bool))
    np.testing.assert_array_equal(np.asarray(ones), np.asarray(out))


def test_padding_does_not_change_the_valid_rows(model, io):
    """A prompt's rows do not depend on how far it is padded (keys past it are masked; the
    relative bias depends only on distances)."""
    ids, mask = io["a/input_ids"][:1], io["a/attention_mask"][:1]
    n = META["prompt_lengths"]["a"][0]
    full = np.asarray(model(ids, mask))[0, :n]
    short = np.asarray(model(ids[:, :n], mask[:, :n]))[0]
    assert rel_l2(short, full) <= RTOL


def test_bfloat16_within_the_bf16_bound(io):
    m = load_umt5(FIXTURE, dtype="bfloat16")
    assert m.shared.weight.get_value().dtype == jnp.bfloat16
    assert m.encoder.block[2].layer[1].DenseReluDense.wo.kernel.get_value().dtype == jnp.bfloat16
    out = m(io["a/input_ids"], io["a/attention_mask"])
    assert out.dtype == jnp.bfloat16
    err = rel_l2(*_valid_rows(out, io["a/last_hidden_state"], META["prompt_lengths"]["a"]))
    assert BF16_U / 4 <= err <= BF16_RTOL, f"bf16 relative L2 {err:.2e} (u = {BF16_U:.2e})"


# ------------------------------------------------------------------ relative position buckets


def _bucket_rule(rel: int, num_buckets: int, max_distance: int) -> int:
    """T5's bidirectional bucket of one relative position, written from the rule: half the
    buckets per side (+n for keys after the query); distances below n/2 exact; then
    ``n/2 + floor((n - n/2) * log(d / (n/2)) / log(max_distance / (n/2)))``, capped at n - 1.
    The log is taken in float64 and rounded to 12 digits, so a value that is an integer in exact
    arithmetic (d = 16, 32, 64 for the defaults) floors to it."""
    n = num_buckets // 2
    exact = n // 2
    side = n if rel > 0 else 0
    d = abs(rel)
    if d < exact:
        return side + d
    scaled = round((n - exact) * math.log(d / exact) / math.log(max_distance / exact), 12)
    return side + min(exact + math.floor(scaled), n - 1)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (32, 64), (20, 50), (8, 16)])
def test_buckets_match_the_rule_brute_force(num_buckets, max_distance):
    length = 300
    got = relative_position_buckets(length, num_buckets, max_distance)
    assert got.shape == (length, length) and got.dtype == np.int32
    for i in range(length):
        for j in range(length):
            assert got[i, j] == _bucket_rule(j - i, num_buckets, max_distance), (i, j)


def test_buckets_match_transformers(io):
    """transformers' own buckets for relative positions -600..600 (32 buckets, distance 128)."""
    rel = io["buckets/relative_position"]
    np.testing.assert_array_equal(relative_position_bucket(rel), io["buckets/bucket"])
    # Every bucket but 16 (distance 0 on the "after" side cannot happen), both saturated ones included.
    assert set(np.unique(io["buckets/bucket"]).tolist()) == set(range(32)) - {16}


# ------------------------------------------------------------------ configs and shapes


def test_umt5_xxl_parameter_count_and_shapes():
    """UMT5-XXL (no weights: ``nnx.eval_shape``): the 242 tensors of Wan's text_encoder/ and
    5,680,910,336 parameters (embedding 256384 x 4096 + 24 blocks of 192,948,224 + the final norm)."""
    cfg = get_config("umt5-xxl")
    abstract = nnx.eval_shape(
        lambda: UMT5EncoderModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    specs = expected_tensors(abstract)
    assert len(specs) == 24 * 10 + 2
    per_block = 4 * 4096 * 4096 + 32 * 64 + 2 * 4096 + 3 * 4096 * 10240
    assert per_block == 192_948_224
    total = sum(math.prod(s.shape) for s in specs.values())
    assert total == 256384 * 4096 + 24 * per_block + 4096 == 5_680_910_336
    shapes = {k: s.shape for k, s in specs.items()}
    assert shapes["shared.weight"] == (256384, 4096)
    assert shapes["encoder.final_layer_norm.weight"] == (4096,)
    prefix = "encoder.block.23.layer."
    for proj in "qkvo":
        assert shapes[f"{prefix}0.SelfAttention.{proj}.weight"] == (4096, 4096)
    assert shapes[f"{prefix}0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    assert shapes[f"{prefix}0.layer_norm.weight"] == shapes[f"{prefix}1.layer_norm.weight"] == (4096,)
    for gate in ("wi_0", "wi_1"):
        assert shapes[f"{prefix}1.DenseReluDense.{gate}.weight"] == (10240, 4096)
    assert shapes[f"{prefix}1.DenseReluDense.wo.weight"] == (4096, 10240)
    assert all(s.dtype == jnp.bfloat16 for s in specs.values())


def test_tiny_config_is_the_fixture_config():
    want = META["model_config"]
    cfg = CONFIGS["tiny"]
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == tuple(
        want[k] for k in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers")
    )
    assert cfg.inner_dim == 48 != cfg.d_model


def test_random_init_runs_under_jit_and_is_finite():
    m = UMT5EncoderModel("tiny", rngs=nnx.Rngs(3), dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(4), (2, 12), 0, 1024, jnp.int32)
    mask = jnp.arange(12)[None, :] < jnp.array([[5], [12]])
    graphdef, state = nnx.split(m)
    out = jax.jit(lambda s, i, k: nnx.merge(graphdef, s)(i, k))(state, ids, mask)
    assert out.shape == (2, 12, 64) and bool(jnp.isfinite(out).all())
    assert float(jnp.std(out)) > 0.1


# ------------------------------------------------------------------ argument errors


@pytest.mark.parametrize(
    "change, match",
    [
        ({"d_model": 0}, "d_model"),
        ({"num_heads": 2.5}, "num_heads"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
        ({"relative_attention_max_distance": 8}, "relative_attention_max_distance"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        CONFIGS["tiny"].replace(**change)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="config must be one of"):
        UMT5EncoderModel("umt5-small", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype must be one of .* float16"):
        UMT5EncoderModel("tiny", rngs=nnx.Rngs(0), dtype=jnp.float16)
    m = UMT5EncoderModel(UMT5Config("t", 16, 8, 4, 2, 8, 1), rngs=nnx.Rngs(0), dtype=jnp.float32)
    ids = np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, L\]"):
        m(ids[0])
    with pytest.raises(ValueError, match="input_ids must hold integers"):
        m(ids.astype(np.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        m(ids, np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="attention_mask must hold booleans"):
        m(ids, np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="relative_position must hold integers"):
        relative_position_bucket(np.array([0.5]))
