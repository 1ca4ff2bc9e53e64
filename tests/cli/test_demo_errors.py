"""The end-to-end demo's reports and files (``python -m models.demo``):

1. on CPU it says what it scales down (clip size, steps, samples) and what to expect (trained
   size, README's GPU figure), in the printed output and in the JSON report;
2. the times are the median of ``--repeats`` runs (default 3) after one warm-up compile, for
   dense and DFS alike, every run kept in the report, and the speedup is the medians' ratio; a
   ``--repeats`` the library refuses is a command-line error naming the option;
3. every printed table and report has a legend line per column / field;
4. the mask PNG has a colour key (kept vs skipped), short per-panel titles, a wrapped figure
   title that overlaps nothing, and axis labels;
5. an MP4 is written next to the GIF when an encoder is installed, and a line says so (no
   failure) when none is;
6. the LICENSE file is the Apache License 2.0 that pyproject declares.

Everything runs on CPU on small seeded configs; nothing asserts a timing value.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
import types

import numpy as np
import pytest

from models import demo
from models.evaluation import media
from helpers import ROOT

REPO = ROOT
TINY_ARGS = ["--mode", "model", "--config", "tiny", "--steps", "6", "--frames", "5", "--height", "64",
             "--width", "128", "--no-progress"]  # fmt: skip


def _small_weights(tmp_path, clip=None):
    """A small random video DiT saved like the shipped one (``clip``: its trained clip size)."""
    import jax.numpy as jnp
    from flax import nnx

    from models.evaluation import harness_weights
    from models.evaluation import small_dit as pretrained
    from models.evaluation.clips import ClipConfig
    from models.wan.transformer import WanTransformer3DModel

    config = pretrained.SMOKE_DIT_CONFIG
    if clip is not None:
        config = dataclasses.replace(config, clip=ClipConfig(*clip))
    model = WanTransformer3DModel(config.wan, rngs=nnx.Rngs(5), dtype=jnp.float32, param_dtype=jnp.float32)
    conditioner = pretrained.ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(6))
    weights = tmp_path / "w.safetensors"
    harness_weights.save_small_video_dit(weights, model, conditioner, config, dtype=jnp.float32)
    return weights, config


def _fake_imageio_ffmpeg(monkeypatch):
    """Installs a stand-in ``imageio_ffmpeg`` (the real one needs its ffmpeg binary) that records
    the frames it is sent and writes a small file on close."""
    record = {"frames": [], "size": None, "kwargs": None}

    def write_frames(path, size, **kwargs):
        record["size"], record["kwargs"] = size, kwargs
        try:
            while True:
                frame = yield
                if frame is not None:
                    record["frames"].append(np.array(frame))
        finally:
            pathlib.Path(path).write_bytes(b"\x00\x00\x00\x18ftypisom fake mp4")

    fake = types.ModuleType("imageio_ffmpeg")
    fake.write_frames = write_frames
    fake.get_ffmpeg_exe = lambda: "/nonexistent/ffmpeg"
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", fake)
    return record


def _no_mp4_encoder(monkeypatch):
    monkeypatch.setattr(media, "mp4_encoder", lambda: None)


# --------------------------------------------------------------------------- 1. what the CPU demo scales down


def test_cpu_demo_says_what_it_scales_down_and_what_to_expect(capsys, tmp_path, monkeypatch):
    """A model trained at 4×32×32 sampled on CPU at (patched) 4×16×16 with 5 steps and 2 samples:
    the output and the JSON say so, give the trained size, README's GPU PSNR and the speedup."""
    weights, config = _small_weights(tmp_path, clip=(4, 32, 32))
    monkeypatch.setattr(demo, "CPU_CLIP", (4, 16, 16))
    monkeypatch.setattr(demo, "CPU_STEPS", 5)
    _no_mp4_encoder(monkeypatch)
    assert demo.main(["--mode", "model", "--weights", str(weights), "--repeats", "1", "--no-progress",
                      "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "scales down" in out
    assert "clips 4×32×32 -> 4×16×16 px" in out and "1,024 -> 256 tokens" in out
    assert f"{demo.GPU_STEPS} -> 5 steps" in out and f"{demo.GPU_SAMPLES} -> 2 samples" in out
    assert "trained at 4×32×32" in out and "lower" in out
    assert "PSNR 25.5 dB" in out and "NVIDIA H200" in out
    report = json.loads((tmp_path / f"compare_{config.wan.name}.json").read_text())
    note = report["scaled_down"]
    assert note["items"]["clip"] == {"trained": [4, 32, 32], "used": [4, 16, 16], "tokens_trained": 1024,
                                     "tokens_used": 256}  # fmt: skip
    assert note["items"]["steps"] == {"gpu_default": demo.GPU_STEPS, "used": 5}
    assert note["items"]["samples"] == {"gpu_default": demo.GPU_SAMPLES, "used": 2}
    assert note["trained_clip"] == [4, 32, 32] and note["gpu_reference"]["psnr_db"] == 25.5
    assert "25.5 dB" in note["expect"] and note["summary"] in out
    assert report["tokens"] == 256 and report["steps"] == 5 and len(report["samples"]) == 2


def test_cpu_demo_scale_note_leaves_out_what_the_user_chose():
    """Sizes, steps and samples given on the command line are not reported as scaled down."""
    from models.evaluation.clips import ClipConfig
    from models.evaluation.small_dit import SMALL_DIT_CONFIG

    cfg = SMALL_DIT_CONFIG
    used = ClipConfig(frames=4, height=32, width=32)
    note = demo.cpu_scale_note(cfg.clip, used, cfg.codec, cfg.wan.patch_size, steps=7, samples=3,
                               user={"clip": False, "steps": True, "samples": True})  # fmt: skip
    assert set(note["items"]) == {"clip"} and "16×64×64 -> 4×32×32" in note["summary"]
    assert note["items"]["clip"]["tokens_trained"] == 16384
    nothing = demo.cpu_scale_note(cfg.clip, cfg.clip, cfg.codec, cfg.wan.patch_size, steps=7, samples=3,
                                  user={"clip": True, "steps": True, "samples": True})  # fmt: skip
    assert nothing["items"] == {} and "nothing scaled down" in nothing["summary"]
    assert "25.5 dB" in nothing["expect"]  # what to expect is said all the same


def test_cpu_demo_gpu_figure_matches_readme_and_the_recorded_run():
    """The GPU figure the CPU demo quotes is README's (and docs/quality.md's), which is the recorded
    H200 demo run."""
    ref = demo.GPU_REFERENCE
    recorded = json.loads((REPO / "benchmarks/results/demo/compare_small-video-dit.json").read_text())
    assert recorded["device"] == ref["device"] and recorded["tokens"] == ref["tokens"]
    assert recorded["steps"] == ref["steps"] and len(recorded["samples"]) == ref["samples"]
    clip = recorded["clip"]
    assert [clip["frames"], clip["height"], clip["width"]] == ref["clip"]
    assert round(recorded["psnr_mean"], 1) == ref["psnr_db"] and round(recorded["ssim_mean"], 2) == ref["ssim"]
    assert round(recorded["speedup"], 2) == ref["speedup"]
    for page in ("README.md", "docs/quality.md"):
        text = (REPO / page).read_text()
        assert f"PSNR {ref['psnr_db']} dB / SSIM {ref['ssim']}" in text and f"({ref['speedup']}×)" in text, page


# --------------------------------------------------------------------------- 2. the median of repeated runs


def test_speedup_is_the_median_of_repeated_runs_after_one_warmup(capsys, tmp_path, monkeypatch):
    """The demo's default: 3 timed runs of each of dense and DFS after exactly one warm-up (one
    compile) each; the report keeps every run and derives times and speedup from the medians."""
    from models.sampling.loop import Sampler

    calls = {"warmup": [], "run": []}
    warmup, call = Sampler.warmup, Sampler.__call__

    def counting_warmup(self, *args, **kwargs):
        calls["warmup"].append(self.backend.name)
        return warmup(self, *args, **kwargs)

    def counting_call(self, *args, **kwargs):
        calls["run"].append((self.backend.name, kwargs.get("num_steps")))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "warmup", counting_warmup)
    monkeypatch.setattr(Sampler, "__call__", counting_call)
    assert demo.main([*TINY_ARGS, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sorted(calls["warmup"]) == ["dense", "dfs"]
    for name in ("dense", "dfs"):
        assert [s for b, s in calls["run"] if b == name].count(6) == demo.DEFAULT_REPEATS == 3
    report = json.loads((tmp_path / "compare_tiny.json").read_text())
    assert report["repeats"] == 3 and report["compiles"] == {"dense": 1, "dfs": 1}
    runs = report["time_runs_s"]
    assert len(runs["dense"]) == len(runs["dfs"]) == 3 and all(t > 0 for t in runs["dense"] + runs["dfs"])
    for name in ("dense", "dfs"):
        assert report["time_total_s"][name] == pytest.approx(statistics.median(runs[name]))
        assert report["time_per_step_s"][name] == pytest.approx(statistics.median(runs[name]) / 6)
    assert report["speedup"] == pytest.approx(statistics.median(runs["dense"]) / statistics.median(runs["dfs"]))
    assert report["speedup_runs"] == pytest.approx([d / s for d, s in zip(runs["dense"], runs["dfs"])])
    assert "median of 3 runs" in out and "speedup per run" in out


def test_speedup_is_the_ratio_of_the_medians_not_of_one_run():
    """With given run times the speedup is median(dense) / median(dfs), robust to one outlier."""
    from models.evaluation.compare import _timing_fields

    fields = _timing_fields({"dense": [1.0, 9.0, 2.0], "dfs": [1.0, 1.0, 0.5]}, steps=4)
    assert fields["time_total_s"] == {"dense": 2.0, "dfs": 1.0}
    assert fields["time_per_step_s"] == {"dense": 0.5, "dfs": 0.25}
    assert fields["speedup"] == 2.0 and fields["speedup_runs"] == [1.0, 9.0, 4.0]
    assert fields["repeats"] == 3 and fields["time_runs_s"]["dense"] == [1.0, 9.0, 2.0]


def test_speedup_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([*TINY_ARGS, "--repeats", "0"])
    err = capsys.readouterr().err
    assert "positive integer" in err
    assert exit_info.value.code == 2 and "error: --repeats must be a positive integer, got 0" in err
    from models.evaluation.compare import _timed_pair

    with pytest.raises(ValueError, match="repeats"):
        _timed_pair(None, None, None, None, None, 2, 1.0, 0)


# --------------------------------------------------------------------------- 3. legends


def _legend(out_lines: list[str], start: int) -> dict[str, str]:
    """The ``legend:`` block that starts at ``out_lines[start]``: name -> explanation."""
    assert out_lines[start].strip() == "legend:"
    entries = {}
    for line in out_lines[start + 1 :]:
        if not line.startswith("    "):
            break
        name, _, text = line.strip().partition("  ")
        entries[name.strip()] = text.strip()
    return entries


def test_every_printed_table_has_a_legend_line_per_column(capsys):
    """The synthetic table: one legend line per column, in the column order, under the table."""
    assert demo.main(["--mode", "synthetic", "--grid", "4,8,16", "--block-size", "32", "--tile-size", "8",
                      "--heads", "2", "--head-dim", "32", "--densities", "0.5"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header == ["order", "density", "blocks", "kept", "recall", "rel.err"]
    legend = _legend(lines, 4)  # header, 2 rows (raster, hilbert3d), then the legend
    assert list(legend) == header and all(len(text) > 10 for text in legend.values())


def _report(**extra):
    return {
        "config": "tiny", "device": "cpu", "tokens": 1280, "steps": 6, "repeats": 3,
        "time_runs_s": {"dense": [0.6, 0.5, 0.7], "dfs": [0.4, 0.5, 0.3]}, "speedup_runs": [1.5, 1.0, 7 / 3],
        "time_total_s": {"dense": 0.6, "dfs": 0.4}, "time_per_step_s": {"dense": 0.1, "dfs": 0.4 / 6},
        "speedup": 1.5, "sparsity": 0.43, "planned_sparsity": 0.43, "refresh_steps": [1, 2, 3],
        "relative_error": 0.01, "report_json": "r.json", "mask_png": "m.png", **extra,
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["random-weights", "small-model"])
def test_every_printed_report_has_a_legend_line_per_field(kind):
    """The model reports: every field printed is explained by a legend line under the report."""
    from models.evaluation.reports import format_clip_report, format_report

    if kind == "random-weights":
        text = format_report(_report())
        fields = ["time/step", "speedup", "runs", "total", "sparsity", "refreshes at", "relative error"]
    else:
        text = format_clip_report(_report(
            weights="w.safetensors", samples=["a / pan", "b / zoom_in"], psnr=[20.0, 21.0], ssim=[0.7, 0.8],
            psnr_mean=20.5, ssim_mean=0.75, gif="demo.gif", mp4=None, mp4_note=None,
        ))  # fmt: skip
        fields = ["time/step", "speedup", "runs", "total", "sparsity", "refreshes at", "PSNR", "SSIM", "video"]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "legend:")
    legend = _legend(lines, start)
    assert list(legend) == [f for f in legend if f in fields] and set(legend) == set(fields)
    body = "\n".join(lines[:start])
    for field in fields:
        assert field in body, f"legend explains {field!r}, which the report does not print"
    # No legend on request (e.g. for a caller that prints several reports).
    assert "legend:" not in (format_report(_report(), legend=False))


# --------------------------------------------------------------------------- 4. the mask figure


def _masks(seed=0, heads=4, nq=12, nk=12):
    rng = np.random.default_rng(seed)
    return {order: rng.random((heads, nq, nk)) < 0.3 for order in ("raster", "hilbert3d")}


@pytest.mark.parametrize(
    "title",
    [
        "small-video-dit: layer 3 block masks at step 1 (density 0.50, 64 key blocks), astronaut / pan",
        "small-video-dit: layer 3 block masks of the last refresh\n(step 37, density 0.2, 128 key blocks), "
        "sample 0 (astronaut / pan)",
    ],
)
@pytest.mark.parametrize("heads", [2, 4])
def test_mask_png_has_a_colour_key_and_titles_that_do_not_overlap(tmp_path, title, heads):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from PIL import Image

    masks = _masks(heads=4)
    fig = media.block_mask_figure(masks, title=title, heads=heads)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        # Colour key: one entry for kept blocks and one for skipped ones, in the panels' colours.
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert any(label.startswith("kept") for label in labels) and any(label.startswith("skipped") for label in labels)
        colours = {to_hex(h.get_facecolor()) for h in legend.legend_handles}
        assert colours == {media.MASK_COLOURS["kept"], media.MASK_COLOURS["skipped"]}
        axes = fig.axes
        assert len(axes) == 2 * heads
        for i, ax in enumerate(axes):
            order = list(masks)[i // heads]
            assert ax.get_xlabel() == "key block" and "query block" in ax.get_ylabel()
            assert len(ax.get_title()) <= 20 and ax.get_title().startswith(f"head {i % heads}")
            if i % heads == 0:
                assert order in ax.get_ylabel()  # the row's order, once per row
        # Nothing overlaps: the figure title, each panel (with its title, labels and ticks) and the key.
        boxes = [("suptitle", fig._suptitle.get_window_extent(renderer)), ("legend", legend.get_window_extent(renderer))]
        boxes += [(f"axes {i}", ax.get_tightbbox(renderer)) for i, ax in enumerate(axes)]
        for a in range(len(boxes)):
            assert fig.bbox.contains(boxes[a][1].x0, boxes[a][1].y0) and fig.bbox.contains(boxes[a][1].x1, boxes[a][1].y1)
            for b in range(a + 1, len(boxes)):
                assert not boxes[a][1].overlaps(boxes[b][1]), f"{boxes[a][0]} overlaps {boxes[b][0]}"
        assert fig._suptitle.get_window_extent(renderer).y0 > max(ax.get_tightbbox(renderer).y1 for ax in axes)
    finally:
        plt.close(fig)
    path = media.plot_block_masks(masks, str(tmp_path / "m.png"), title=title, heads=heads)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 200


# --------------------------------------------------------------------------- 5. MP4 next to the GIF


def test_mp4_is_written_next_to_the_gif_when_an_encoder_is_installed(capsys, tmp_path, monkeypatch):
    """With an (stand-in) imageio-ffmpeg the demo writes demo_<model>.mp4 beside the GIF, one
    H.264-sized frame (multiples of 16 px) per video frame, and reports it."""
    record = _fake_imageio_ffmpeg(monkeypatch)
    assert media.mp4_encoder() == "imageio-ffmpeg"
    weights, config = _small_weights(tmp_path)
    assert demo.main(["--mode", "model", "--weights", str(weights), "--steps", "5", "--samples", "2",
                      "--repeats", "1", "--no-progress", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    name = config.wan.name
    mp4, gif = tmp_path / f"demo_{name}.mp4", tmp_path / f"demo_{name}.gif"
    assert mp4.is_file() and gif.is_file() and f"demo_{name}.mp4" in out
    report = json.loads((tmp_path / f"compare_{name}.json").read_text())
    assert report["mp4"].endswith(f"demo_{name}.mp4") and report["mp4_note"] is None
    assert len(record["frames"]) == config.clip.frames
    h, w, _ = record["frames"][0].shape
    assert h % 16 == 0 and w % 16 == 0 and record["size"] == (w, h)
    assert record["kwargs"]["codec"] == "libx264" and record["kwargs"]["pix_fmt_out"] == "yuv420p"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # written atomically


def test_mp4_missing_encoder_is_reported_not_a_failure(capsys, tmp_path, monkeypatch):
    _no_mp4_encoder(monkeypatch)
    weights, config = _small_weights(tmp_path)
    assert demo.main(["--mode", "model", "--weights", str(weights), "--steps", "5", "--samples", "2",
                      "--repeats", "1", "--no-progress", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    name = config.wan.name
    assert "no MP4 written: no MP4 encoder is installed" in out and "imageio-ffmpeg" in out
    assert (tmp_path / f"demo_{name}.gif").is_file() and not (tmp_path / f"demo_{name}.mp4").exists()
    report = json.loads((tmp_path / f"compare_{name}.json").read_text())
    assert report["mp4"] is None and "no MP4 encoder" in report["mp4_note"]


def test_mp4_encoder_detection_finds_none_without_imageio_ffmpeg_or_ffmpeg(monkeypatch):
    """Neither imageio-ffmpeg nor an ffmpeg for matplotlib: None, and the writer writes nothing."""
    from matplotlib import animation

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    monkeypatch.setattr(animation.writers, "is_available", lambda name: False)
    assert media.mp4_encoder() is None
    video = np.zeros((1, 2, 8, 8, 3))
    assert media.write_side_by_side_mp4(video, video, "/nonexistent/never.mp4") is None
    monkeypatch.setattr(animation.writers, "is_available", lambda name: name == "ffmpeg")
    assert media.mp4_encoder() == "matplotlib-ffmpeg"


def test_mp4_encodes_a_playable_video_with_the_installed_encoder(tmp_path):
    """The real encoder, where one is installed: a readable H.264 MP4 with every frame."""
    encoder = media.mp4_encoder()
    if encoder is None:
        pytest.skip("no MP4 encoder installed (imageio-ffmpeg or ffmpeg)")
    rng = np.random.default_rng(0)
    left = rng.uniform(-1, 1, (2, 3, 8, 8, 3))
    path = media.write_side_by_side_mp4(left, -left, tmp_path / "v.mp4", captions=["a", "b"], scale=3)
    data = pathlib.Path(path).read_bytes()
    assert data[4:8] == b"ftyp" and len(data) > 1000


# --------------------------------------------------------------------------- 6. the licence


def test_license_file_is_the_apache_2_license_pyproject_declares():
    import tomllib

    text = (REPO / "LICENSE").read_text()
    assert text.split("\n")[0].strip() == "Apache License" and "Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                    "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                    "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS",
                    "APPENDIX: How to apply the Apache License to your work."):  # fmt: skip
        assert section in text, section
    assert "Copyright 2026 The dfsattn-jax Authors" in text and "[yyyy]" not in text
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] in ("Apache-2.0", {"text": "Apache-2.0"})
