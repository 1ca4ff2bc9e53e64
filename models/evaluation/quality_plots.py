"""The quality benchmark's figures, drawn from one model's stored results (the report's JSON).

* :func:`plot_density`: PSNR (with its 95 % interval) and recall vs density, per order and baseline;
* :func:`plot_layers`: per layer, the dense attention's concentration, each order's recall and the
  missed mass by distance class;
* :func:`plot_recall_steps`: recall of the layout in force vs denoising step;
* :func:`cache_masks`: the block masks a run's final mask cache holds, for
  :func:`~models.evaluation.media.plot_block_masks`.

matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dfsattn_jax.cache import MaskCache, cache_layout
from dfsattn_jax.metrics import DISTANCE_CLASS_NAMES
from models.evaluation.quality_summary import as_float, as_matrix, nanmean

__all__ = ["cache_masks", "plot_density", "plot_layers", "plot_recall_steps"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Lays out ``fig``, writes it to ``path`` (PNG, 120 dpi) and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_density(report: dict, path: str) -> str:
    """PSNR (with its 95 % interval) and recall vs density per order, window, random, block pooling."""
    plt = _pyplot()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    dens = list(meta["densities"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(o, f"{o}/d={{d:g}}", f"{o}/default", "-", "o") for o in meta["orders"]]
    series += [(f"window ({o})", f"window-{o}/d={{d:g}}", f"window-{o}/default", "--", "s") for o in meta["window_orders"]]
    series += [(f"random ({o})", f"random-{o}/d={{d:g}}", f"random-{o}/default", "-.", "x") for o in meta["random_orders"]]
    series += [(f"oracle ({o})", f"oracle-{o}/d={{d:g}}", f"oracle-{o}/default", "--", "*") for o in meta.get("oracle_orders", [])]
    series.append((f"block pooling (tile {meta['block_size']})", f"hilbert3d/tile{meta['block_size']}/d={{d:g}}",
                   f"hilbert3d/tile{meta['block_size']}/default", ":", "^"))  # fmt: skip
    for ax, key, label in ((axes[0], "psnr_mean", "PSNR vs dense (dB), mean ± 95% CI"), (axes[1], "recall_mean", "recall")):
        for name, pattern, default, style, marker in series:
            xs, ys, es = [], [], []
            for d in dens:
                r = by.get(pattern.format(d=d))
                if r is not None and np.isfinite(as_float(r.get(key))):
                    xs.append(d)
                    ys.append(as_float(r[key]))
                    es.append(as_float(r.get("psnr_ci95")) if key == "psnr_mean" else 0.0)
            if not xs:
                continue
            es = np.nan_to_num(np.asarray(es, float))
            line = ax.errorbar(xs, ys, yerr=es if key == "psnr_mean" else None, ls=style, marker=marker, label=name, ms=4,
                               capsize=2)[0]  # fmt: skip
            r = by.get(default)
            if r is not None and np.isfinite(as_float(r.get(key))):
                ax.plot([r["mean_density"]], [as_float(r[key])], marker="*", ms=12, color=line.get_color(), ls="none")
        ax.set_xlabel("density (kept fraction of key blocks); ★ default schedule at its mean density", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{meta['model']}: grid {meta['token_grid']} = {meta['tokens']} tokens, {meta['samples']} samples, "
                 f"{meta['steps']} steps ({report['device']})", fontsize=9)  # fmt: skip
    return _save(fig, path)


def plot_layers(report: dict, path: str) -> str:
    """Per layer: the dense attention's concentration, recall of each order at density 0.2, and
    the missed mass by distance class per order."""
    plt = _pyplot()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    layers = np.arange(meta["num_layers"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dense = by.get("dense")
    if dense:
        axes[0].plot(layers, [as_float(x) for x in dense["top_mass_per_layer"]], "k-o", label="raster blocks (dense run)")
    for o in meta["orders"]:
        r = by.get(f"{o}/default")
        if r:
            axes[0].plot(layers, [as_float(x) for x in r["top_mass_dense_steps_per_layer"]], "--.", label=f"{o} blocks (dense steps)")
    axes[0].set_title("mass of each row's top 20% key blocks (dense attention)", fontsize=9)
    axes[0].set_xlabel("layer")
    axes[0].set_ylim(0, 1)
    density = next((f"d={d:g}" for d in meta["densities"] if abs(d - 0.2) < 1e-9), "default")
    names = [(o, f"{o}/{density}") for o in meta["orders"]] + [(f"random ({o})", f"random-{o}/{density}") for o in meta["random_orders"]]
    classes = len(DISTANCE_CLASS_NAMES)
    bottoms = np.zeros(len(names))
    for label, name in names:
        r = by.get(name)
        if not r or not r.get("recall_per_layer"):
            continue
        axes[1].plot(layers, [as_float(x) for x in r["recall_per_layer"]], "-o", ms=3, label=label)
    colours = plt.cm.viridis(np.linspace(0, 0.9, classes))
    for c in range(classes):
        values = []
        for label, name in names:
            r = by.get(name)
            if not r or not r.get("missed_by_class_per_layer"):
                values.append(0.0)
                continue
            missed = as_matrix(r["missed_by_class_per_layer"])
            values.append(float(nanmean(missed[meta["sparse_layers"], c])))
        axes[2].bar(np.arange(len(names)), values, bottom=bottoms, color=colours[c], label=DISTANCE_CLASS_NAMES[c])
        bottoms += np.asarray(values)
    axes[1].set_title(f"recall per layer at {density}", fontsize=9)
    axes[1].set_xlabel("layer")
    axes[2].set_xticks(np.arange(len(names)), [label for label, _ in names], rotation=30, fontsize=7)
    axes[2].set_title(f"missed mass by distance class at {density} (sparse layers)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{meta['model']}: attention per layer ({report['device']})", fontsize=9)
    return _save(fig, path)


def plot_recall_steps(report: dict, path: str, names: Sequence[str]) -> str:
    """Recall vs step (mean over sparse layers) for a few variants, and per layer for hilbert3d/default."""
    plt = _pyplot()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    sparse_layers = meta["sparse_layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        r = by.get(name)
        if r is None:
            continue
        rec = as_matrix(r["recall_per_step_layer"])
        steps = np.arange(rec.shape[0])
        ok = ~np.isnan(rec[:, sparse_layers]).all(axis=1)
        axes[0].plot(steps[ok], nanmean(rec[ok][:, sparse_layers], axis=1), label=name, lw=1.2)
    axes[0].set_title("mean over sparse layers", fontsize=9)
    r = by.get("hilbert3d/default")
    if r is not None:
        rec = as_matrix(r["recall_per_step_layer"])
        steps = np.arange(rec.shape[0])
        for layer in range(rec.shape[1]):
            ok = ~np.isnan(rec[:, layer])
            axes[1].plot(steps[ok], rec[ok, layer], lw=1.2,
                         label=f"layer {layer}" + (" (dense)" if layer not in sparse_layers else ""))  # fmt: skip
        axes[1].set_title("hilbert3d/default, per layer", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising step")
        ax.set_ylabel("recall of the layout in force")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['model']}: recall vs step ({report['device']})", fontsize=9)
    return _save(fig, path)


def cache_masks(cache: MaskCache, slot: int, num_key_blocks: int) -> np.ndarray:
    """Block masks ``bool[N, nq, nk]`` of the first batch element in a final mask cache's ``slot``."""
    return np.asarray(cache_layout(cache, slot, num_key_blocks).to_dense_mask()[0])
