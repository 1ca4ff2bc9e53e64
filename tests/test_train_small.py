"""benchmarks/train_small.py: checkpoints restore exactly; the smoke run trains, resumes, samples, exports."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import train_small
from models.evaluation import small_dit as pretrained


def _random_like(rng: np.random.Generator, tree):
    """Fresh random values with the shapes and dtypes of an (abstract) pytree, without XLA."""

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.asarray(rng.integers(1, 1000, size=leaf.shape).astype(leaf.dtype))
        return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))

    return jax.tree.map(fill, tree)


@pytest.mark.parametrize("seed", [0, 1])
def test_checkpoint_roundtrip_restores_params_optimizer_and_step(tmp_path, seed):
    config = pretrained.SMOKE_DIT_CONFIG
    cfg = train_small.TrainConfig(steps=10, batch=2)
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: train_small.SmallDiT(config, rngs=nnx.Rngs(0), dtype=jnp.float32))
    _, params_shape = nnx.split(abstract, nnx.Param)
    tx = train_small.make_optimizer(cfg)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    params = _random_like(rng, params_shape)
    opt_state = _random_like(rng, opt_shape)  # moments and counts all non-trivial
    path = tmp_path / "ckpt.safetensors"
    step = int(rng.integers(1, 10_000))
    train_small.save_checkpoint(path, params, opt_state, step, config, cfg)

    params2, opt2, step2 = train_small.load_checkpoint(path, params_shape, opt_shape, config)
    assert step2 == step
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), nnx.to_pure_dict(params2))
    jax.tree.map(np.testing.assert_array_equal, opt_state, opt2)
    other = pretrained.SmallDiTConfig(wan=config.wan, clip=config.clip, guidance_scale=config.guidance_scale + 1)
    with pytest.raises(ValueError, match="another model config"):
        train_small.load_checkpoint(path, params_shape, opt_shape, other)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_distribution_is_shifted_logit_normal(seed):
    sigma = np.asarray(train_small.sample_sigmas(jax.random.key(seed), 20000, 3.0))
    assert sigma.min() > 0 and sigma.max() < 1
    # the median of u = sigmoid(N(0, 1)) is 1/2, shifted: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(float(np.median(sigma)) - 0.75) < 0.02


def test_smoke_run_trains_resumes_samples_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    first = train_small.main(["--smoke", "--steps", "1", "--no-samples", "--out", str(out)])
    assert first["steps"] == 1 and np.isfinite(first["final_loss"])
    assert (out / "checkpoint.safetensors").is_file() and (out / "loss.png").is_file()
    export = tmp_path / "w.safetensors"
    second = train_small.main([
        "--smoke", "--steps", "1", "--sample-steps", "1", "--num-samples", "2",
        "--out", str(out), "--export", str(export), "--results", str(tmp_path / "results"),
    ])  # fmt: skip
    assert "resumed from" in capsys.readouterr().out
    assert second["steps"] == 1
    assert json.loads((out / "losses.json").read_text())[0][0] == 0
    for name in ("samples.png", "samples.gif", "train_summary.json"):
        assert (out / name).is_file()
        assert (tmp_path / "results" / name).read_bytes() == (out / name).read_bytes()
    model, config = pretrained.load_small_video_dit(export, dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == pretrained.SMOKE_DIT_CONFIG
    # the export is the checkpoint's transformer rounded to bfloat16
    template = train_small.SmallDiT(config, rngs=nnx.Rngs(0), dtype=jnp.float32)
    _, params = nnx.split(template, nnx.Param)
    tx = train_small.make_optimizer(train_small.TrainConfig(steps=1, batch=2))
    params, _, _ = train_small.load_checkpoint(out / "checkpoint.safetensors", params, tx.init(params), config)
    expected = jax.tree.map(
        lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), nnx.to_pure_dict(params)["transformer"]
    )
    jax.tree.map(np.testing.assert_array_equal, expected, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
