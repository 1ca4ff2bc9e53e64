"""The quality benchmark's figures (models/evaluation/quality_plots.py), drawn from the committed results."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dfsattn_jax.cache import MaskCache
from models.evaluation.quality_plots import cache_masks, plot_density, plot_layers, plot_recall_steps
from helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def test_figures_from_the_committed_results(tmp_path):
    report = json.loads((RESULTS / "quality_v2_nvidia_h200.json").read_text())
    paths = [
        plot_density(report, str(tmp_path / "density.png")),
        plot_layers(report, str(tmp_path / "layers.png")),
        plot_recall_steps(report, str(tmp_path / "recall.png"), ["hilbert3d/default", "raster/default", "not-run"]),
    ]
    for path, width in zip(paths, (11, 15, 11)):
        with Image.open(path) as png:
            assert png.size[0] == width * 120 and png.size[1] == round(4.2 * 120)
            assert len(np.unique(np.asarray(png.convert("L")))) > 16  # something drawn


def test_figures_of_a_dense_only_report(tmp_path):
    report = json.loads((RESULTS / "quality_v1_nvidia_h200.json").read_text())
    dense_only = {**report, "variants": [r for r in report["variants"] if r["name"] == "dense"]}
    for plot in (plot_density, plot_layers):
        assert plot(dense_only, str(tmp_path / f"{plot.__name__}.png")) == str(tmp_path / f"{plot.__name__}.png")
    assert (tmp_path / "plot_layers.png").stat().st_size > 5000


def test_cache_masks_are_the_first_sample_of_a_slot():
    rng = np.random.default_rng(2)
    slots, batch, heads, nq, kmax, nk = 2, 2, 3, 4, 2, 5
    indices = np.stack([np.stack([np.stack([np.stack([rng.choice(nk, kmax, replace=False) for _ in range(nq)])
                                            for _ in range(heads)]) for _ in range(batch)]) for _ in range(slots)])  # fmt: skip
    counts = rng.integers(1, kmax + 1, size=(slots, batch, heads, nq))
    cache = MaskCache(indices.astype(np.int32), counts.astype(np.int32), np.int32(1))
    masks = cache_masks(cache, 1, nk)
    assert masks.shape == (heads, nq, nk) and masks.dtype == bool
    for h in range(heads):
        for q in range(nq):
            expected = np.zeros(nk, bool)
            expected[indices[1, 0, h, q, : counts[1, 0, h, q]]] = True
            np.testing.assert_array_equal(masks[h, q], expected)
