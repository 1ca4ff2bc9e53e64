"""Training a small video DiT: the stages and the learning rate (:mod:`models.evaluation.training`),
both checkpoint kinds (:mod:`models.evaluation.training_checkpoints`), and the driver
``python -m benchmarks.train_small``: its ``--stages`` text, its resume choice, its pictures, and
a smoke run that trains across two stages, resumes, evaluates and exports."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import train_small
from models.evaluation import harness_weights, training, training_checkpoints
from models.evaluation import small_dit as pretrained

SMOKE_STAGES = (training.Stage(3, 2, 2, 16, 16), training.Stage(6, 2, 4, 16, 16))


def _random_like(rng: np.random.Generator, tree):
    """Fresh random values with the shapes and dtypes of an (abstract) pytree, without XLA."""

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.asarray(rng.integers(1, 1000, size=leaf.shape).astype(leaf.dtype))
        return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))

    return jax.tree.map(fill, tree)


def _bf16_rounded(params):
    """The params as a compact checkpoint restores them: rounded to bfloat16 once, float32."""
    return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), nnx.to_pure_dict(params))


def _templates(cfg):
    abstract = nnx.eval_shape(lambda: training.SmallDiT(pretrained.SMOKE_DIT_CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32))
    _, params_shape = nnx.split(abstract, nnx.Param)
    return params_shape, jax.eval_shape(training.make_optimizer(cfg).init, params_shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_checkpoint_roundtrip_restores_params_optimizer_and_step(tmp_path, seed):
    config = pretrained.SMOKE_DIT_CONFIG
    cfg = training.TrainConfig(stages=SMOKE_STAGES)
    rng = np.random.default_rng(seed)
    params_shape, opt_shape = _templates(cfg)
    params = _random_like(rng, params_shape)
    opt_state = _random_like(rng, opt_shape)  # moments and counts all non-trivial
    path = tmp_path / "ckpt.safetensors"
    step = int(rng.integers(1, 10_000))
    training_checkpoints.save_checkpoint(path, params, opt_state, step, config, cfg, rewarm_from=step - 1)

    params2, opt2, step2 = training_checkpoints.load_checkpoint(path, params_shape, opt_shape, config)
    assert step2 == step and training_checkpoints.checkpoint_info(path)["rewarm_from"] == str(step - 1)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), nnx.to_pure_dict(params2))
    jax.tree.map(np.testing.assert_array_equal, opt_state, opt2)
    other = pretrained.SmallDiTConfig(wan=config.wan, clip=config.clip, guidance_scale=config.guidance_scale + 1)
    with pytest.raises(ValueError, match="another model config"):
        training_checkpoints.load_checkpoint(path, params_shape, opt_shape, other)


def test_compact_checkpoint_travels_in_small_shards_and_resumes(tmp_path):
    config = pretrained.SMOKE_DIT_CONFIG
    cfg = training.TrainConfig(stages=SMOKE_STAGES)
    rng = np.random.default_rng(5)
    params_shape, _ = _templates(cfg)
    params = _random_like(rng, params_shape)
    history = {"losses": [(0, 2.5), (1, 2.25)], "heldout": [(1, 2.0)]}
    digests = training_checkpoints.save_compact(tmp_path, params, 2, config, cfg, history, max_shard_bytes=150_000)
    assert len(digests) >= 2 and all((tmp_path / name).stat().st_size <= 150_000 for name in digests)
    assert training_checkpoints.compact_info(tmp_path)["step"] == "2" and training_checkpoints.compact_info(tmp_path / "absent") is None
    restored, step, hist = training_checkpoints.load_compact(tmp_path, _random_like(np.random.default_rng(6), params_shape), config)
    assert step == 2 and hist == history
    rounded = _bf16_rounded(params)
    jax.tree.map(np.testing.assert_array_equal, rounded, nnx.to_pure_dict(restored))
    # The run resumes from it (moments restarted, learning rate re-warmed) when --out holds nothing newer.
    args = argparse.Namespace(fresh=False, carry_in=tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    fresh_opt = training.make_optimizer(cfg).init(params)
    got = train_small._resume(args, out, _random_like(np.random.default_rng(7), params_shape), fresh_opt, config, cfg)
    assert got[2] == 2 and got[4] == 2 and got[5] == "compact" and got[3] == history
    jax.tree.map(np.testing.assert_array_equal, rounded, nnx.to_pure_dict(got[0]))
    other = pretrained.SmallDiTConfig(wan=config.wan, clip=config.clip, guidance_scale=config.guidance_scale + 1)
    with pytest.raises(ValueError, match="another model config"):
        training_checkpoints.load_compact(tmp_path, params_shape, other)


def test_compact_checkpoint_metadata_is_the_one_record_of_step_config_and_histories(tmp_path):
    """A compact checkpoint written now (no compact.json) resumes at its step, under its config,
    with its histories, when --out's full checkpoint is older; the newer full one wins otherwise."""
    config = pretrained.SMOKE_DIT_CONFIG
    cfg = training.TrainConfig(stages=SMOKE_STAGES, lr=3e-4, seed=11)
    rng = np.random.default_rng(8)
    params_shape, opt_shape = _templates(cfg)
    params = _random_like(rng, params_shape)
    losses = [(s, float(v)) for s, v in enumerate(rng.uniform(0.5, 3.0, 37))]
    history = {"losses": losses, "heldout": [(20, 1.75), (37, 1.5)]}
    carry, out = tmp_path / "carry", tmp_path / "run"
    digests = training_checkpoints.save_compact(carry, params, 37, config, cfg, history, max_shard_bytes=150_000)
    assert sorted(p.name for p in carry.iterdir()) == sorted([*digests, "compact.safetensors.sha256"])
    info = training_checkpoints.compact_info(carry)
    assert (info["step"], info["config"], info["train"]) == ("37", config.to_json(), cfg.to_json())
    _, meta = harness_weights.read_sharded(carry / training_checkpoints.COMPACT)  # every shard carries the same header
    assert json.loads(meta["losses"]) == [list(h) for h in history["losses"]]
    out.mkdir()
    older = (_random_like(rng, params_shape), _random_like(rng, opt_shape))
    training_checkpoints.save_checkpoint(out / training_checkpoints.CHECKPOINT, *older, 30, config, cfg)
    args = argparse.Namespace(fresh=False, carry_in=carry)
    fresh_opt = training.make_optimizer(cfg).init(params)
    restored, _, step, hist, rewarm_from, source = train_small._resume(
        args, out, _random_like(np.random.default_rng(9), params_shape), fresh_opt, config, cfg
    )
    assert (step, rewarm_from, source, hist) == (37, 37, "compact", history)
    rounded = _bf16_rounded(params)
    jax.tree.map(np.testing.assert_array_equal, rounded, nnx.to_pure_dict(restored))
    training_checkpoints.save_checkpoint(out / training_checkpoints.CHECKPOINT, params, _random_like(rng, opt_shape), 38, config, cfg)
    got = train_small._resume(args, out, params_shape, opt_shape, config, cfg)
    assert (got[2], got[5]) == (38, "full")
    other = pretrained.SmallDiTConfig(wan=config.wan, clip=config.clip, guidance_scale=config.guidance_scale + 1)
    with pytest.raises(ValueError, match="another model config"):
        train_small._resume(args, tmp_path / "empty", params_shape, fresh_opt, other, cfg)


def test_learning_rate_warms_up_decays_and_rewarms():
    cfg = training.TrainConfig(stages=(training.Stage(1000, 2, 2, 16, 16),), lr=4e-4, warmup=100, final_lr=0.1, rewarm=50)
    lr = np.array([training.learning_rate(s, cfg) for s in range(1000)])
    assert lr[0] == 0.0 and lr[50] == pytest.approx(2e-4) and lr[100] == pytest.approx(4e-4)
    assert np.all(np.diff(lr[:100]) > 0) and np.all(np.diff(lr[100:]) <= 1e-12)
    assert lr[-1] == pytest.approx(4e-5, rel=1e-3)  # cosine down to 10 % at the last step
    ramp = np.array([training.learning_rate(s, cfg, rewarm_from=400) for s in range(1000)])
    np.testing.assert_array_equal(ramp[:400], lr[:400])
    np.testing.assert_allclose(ramp[400:450], lr[400:450] * np.arange(1, 51) / 50, rtol=1e-12)
    np.testing.assert_array_equal(ramp[450:], lr[450:])


def test_stages_parse_and_validate():
    stages = train_small.parse_stages("2000:32:4x60x108, 3100:8:16x60x108")
    assert stages == (training.Stage(2000, 32, 4, 60, 108), training.Stage(3100, 8, 16, 60, 108))
    cfg = training.TrainConfig(stages=stages)
    assert cfg.steps == 3100 and cfg.stage_index(0) == 0 and cfg.stage_index(1999) == 0 and cfg.stage_index(2000) == 1
    with pytest.raises(ValueError, match="past the last stage"):
        cfg.stage_index(3100)
    for bad, match in (("10:2:4x16", "END:BATCH:FxHxW"), ("10:2:4x16x16,5:2:4x16x16", "must increase"),
                       ("10:0:4x16x16", "batch"), ("", "at least one")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train_small.parse_stages(bad)
    config, v2 = training.recipe("v2")
    assert config == pretrained.SMALL_DIT_V2_CONFIG and v2.stages[-1].clip(config.clip) == config.clip


@pytest.mark.parametrize("width,scale", [(32, 2), (108, 1)])
def test_sample_gif_doubles_only_narrow_clips(tmp_path, width, scale):
    """v1's narrow clips are doubled in the side-by-side GIF, v2's 108-px clips kept (size)."""
    from PIL import Image

    rng = np.random.default_rng(width)
    real, generated = (rng.uniform(-1, 1, size=(2, 3, 12, width, 3)) for _ in range(2))
    train_small.save_sample_pictures(real, generated, ["a", "b"], tmp_path / "s.png", tmp_path / "s.gif")
    with Image.open(tmp_path / "s.gif") as gif:
        assert gif.n_frames == 3 and gif.size[0] == 2 * scale * width + 3 * 6
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_distribution_is_shifted_logit_normal(seed):
    from models.evaluation.learning import sample_sigmas

    sigma = np.asarray(sample_sigmas(jax.random.key(seed), 20000, 3.0))
    assert sigma.min() > 0 and sigma.max() < 1
    # the median of u = sigmoid(N(0, 1)) is 1/2, shifted: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(float(np.median(sigma)) - 0.75) < 0.02


def test_smoke_run_trains_across_stages_resumes_evaluates_and_exports(tmp_path, capsys):
    out, carry = tmp_path / "run", tmp_path / "carry"
    stages = "1:2:2x16x16,3:2:4x16x16"
    first = train_small.main(["--smoke", "--stages", stages, "--time-limit", "0", "--eval-every", "0",
                              "--out", str(out), "--carry-out", str(carry)])  # fmt: skip
    assert first["steps"] == 1 and not first["complete"] and np.isfinite(first["final_loss"])
    assert (out / "checkpoint.safetensors").is_file() and (out / "loss.png").is_file()
    assert training_checkpoints.compact_info(carry)["step"] == "1" and "learning" not in first
    export = tmp_path / "w.safetensors"
    second = train_small.main([
        "--smoke", "--stages", stages, "--eval-every", "0", "--sample-steps", "1", "--eval-samples", "2",
        "--eval-candidates", "2", "--out", str(out), "--carry-in", str(carry), "--carry-out", str(carry),
        "--export", str(export), "--results", str(tmp_path / "results"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "resumed from the full checkpoint" in printed and "stage 1: steps 1-2" in printed
    assert second["steps"] == 3 and second["complete"] and second["start_step"] == 1
    assert [s for s, _ in json.loads((out / "losses.json").read_text())] == [0, 1, 2]
    assert second["heldout_history"][-1][0] == 3 and np.isfinite(second["heldout"])
    learning = second["learning"]
    assert len(learning["samples"]["nearest_psnr"]) == 2 and 0.0 <= learning["real"]["photo_accuracy"] <= 1.0
    assert training_checkpoints.compact_info(carry)["step"] == "1"  # a finished, exported run writes no compact checkpoint
    for name in ("samples.png", "samples.gif", "train_summary.json"):
        assert (out / name).is_file()
        assert (tmp_path / "results" / name).read_bytes() == (out / name).read_bytes()
    model, config = pretrained.load_small_video_dit(export, dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == pretrained.SMOKE_DIT_CONFIG and second["sha256"] == harness_weights.read_weights_checksums(export)
    # the export is the checkpoint's transformer rounded to bfloat16
    template = training.SmallDiT(config, rngs=nnx.Rngs(0), dtype=jnp.float32)
    _, params = nnx.split(template, nnx.Param)
    cfg = training.TrainConfig(stages=train_small.parse_stages(stages))
    params, _, _ = training_checkpoints.load_checkpoint(out / "checkpoint.safetensors", params, training.make_optimizer(cfg).init(params), config)
    expected = jax.tree.map(
        lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), nnx.to_pure_dict(params)["transformer"]
    )
    jax.tree.map(np.testing.assert_array_equal, expected, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
