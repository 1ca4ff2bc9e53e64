"""The end-to-end demo on a tiny synthetic grid."""

import pytest

from models import demo
from models.evaluation.synthetic import synthetic_report

TINY = dict(heads=2, head_dim=32, block_size=32, tile_size=8)


def test_main_prints_the_table(capsys):
    assert demo.main(["--mode", "synthetic", "--grid", "4,8,16", "--block-size", "32", "--tile-size", "8", "--heads", "2",
                      "--head-dim", "32", "--densities", "0.5,0.2"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert lines[1] == ["order", "density", "blocks", "kept", "recall", "rel.err"]
    rows = lines[2:6]
    assert lines[6] == ["legend:"]  # then one line per column (tests/cli/test_demo_errors.py)
    assert [(r[0], r[1]) for r in rows] == [("raster", "0.50"), ("raster", "0.20"), ("hilbert3d", "0.50"), ("hilbert3d", "0.20")]
    for r in rows:
        assert 0.0 < float(r[4]) <= 1.0 and 0.0 < float(r[5]) < 1.0


def test_model_mode_reports_and_writes_files(capsys, tmp_path):
    """The model comparison on the tiny config: report printed, JSON and mask PNG written."""
    import json

    assert demo.main(["--mode", "model", "--config", "tiny", "--steps", "6", "--frames", "5", "--height", "64",
                      "--width", "128", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "relative error vs dense" in out
    report = json.loads((tmp_path / "compare_tiny.json").read_text())
    assert report["steps"] == 6 and report["config"] == "tiny"
    # The schedule is scaled to 6 steps (dense step 0, refreshes after it), so sparse steps run.
    assert report["sparse_steps"] >= 1 and report["refresh_steps"]
    assert 0.0 < report["sparsity"] < 1.0 and report["relative_error"] > 0.0
    assert (tmp_path / "masks_tiny.png").stat().st_size > 1000


def test_model_mode_with_trained_weights_writes_gif(capsys, tmp_path):
    """--config auto with a weights file: the small-model path samples classes, prints PSNR/SSIM, writes the GIF."""
    import json

    import jax.numpy as jnp
    from flax import nnx
    from PIL import Image

    from models.evaluation import harness_weights
    from models.evaluation import small_dit as pretrained
    from models.wan.transformer import WanTransformer3DModel

    config = pretrained.SMOKE_DIT_CONFIG
    model = WanTransformer3DModel(config.wan, rngs=nnx.Rngs(5), dtype=jnp.float32, param_dtype=jnp.float32)
    conditioner = pretrained.ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(6))
    weights = tmp_path / "w.safetensors"
    harness_weights.save_small_video_dit(weights, model, conditioner, config, dtype=jnp.float32)
    assert demo.main(["--mode", "model", "--weights", str(weights), "--steps", "5", "--samples", "2",
                      "--no-progress", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "SSIM" in out and "speedup" in out
    report = json.loads((tmp_path / "compare_smoke-video-dit.json").read_text())
    assert report["steps"] == 5 and len(report["samples"]) == 2 and report["tokens"] == 256
    assert all(10.0 < p for p in report["psnr"]) and all(0.0 < s <= 1.0 for s in report["ssim"])
    assert 0.0 < report["sparsity"] < 1.0 and report["refresh_steps"]
    with Image.open(tmp_path / "demo_smoke-video-dit.gif") as gif:
        assert gif.n_frames == config.clip.frames
    assert (tmp_path / "masks_smoke-video-dit.png").stat().st_size > 1000


def test_auto_config_uses_the_small_model_only_when_weights_exist(tmp_path, monkeypatch):
    from models.evaluation import small_dit as pretrained

    missing = tmp_path / "absent.safetensors"
    monkeypatch.setattr(pretrained, "default_weights_path", lambda: missing)
    assert not demo._use_small_model("auto", None)
    missing.write_bytes(b"x")
    assert demo._use_small_model("auto", None)
    assert demo._use_small_model("auto", "some/file.safetensors") and demo._use_small_model("small", None)
    assert not demo._use_small_model("tiny", None) and not demo._use_small_model("wan2.1-1.3b", "x")


@pytest.mark.parametrize("seed", [0, 1])
def test_hilbert3d_recalls_at_least_raster_on_smooth_fields(seed):
    rows = synthetic_report((4, 8, 16), densities=(0.2,), seed=seed, **TINY)
    by_order = {r["order"]: r for r in rows}
    assert by_order["raster"]["num_blocks"] == by_order["hilbert3d"]["num_blocks"] == 3  # int(0.2 * 16)
    assert by_order["hilbert3d"]["recall"] >= by_order["raster"]["recall"]
    assert by_order["hilbert3d"]["error"] <= by_order["raster"]["error"]


def test_demo_bad_arguments():
    with pytest.raises(ValueError, match="orders"):
        synthetic_report((2, 4, 4), orders=("spiral",), **TINY)
    with pytest.raises(ValueError, match="density"):
        synthetic_report((2, 4, 4), densities=(0.0,), **TINY)
    with pytest.raises(ValueError, match="grid"):
        synthetic_report((2, 4), **TINY)
