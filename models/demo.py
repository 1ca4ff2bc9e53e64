"""End-to-end demo: ``python -m models.demo``.

Two parts (``--mode all`` runs both, the default):

* ``model``: a Wan2.1-architecture video DiT samples the same noise dense and with DFSAttn.
  By default (``--config auto``) it is the small video DiT trained here and shipped in
  ``models/evaluation/weights`` (:mod:`models.evaluation.small_dit`), when its weights are present: a few clip classes
  (``--samples``) are sampled, decoded, compared (PSNR/SSIM of the DFSAttn video against the dense
  one) and written side by side as a GIF (:func:`models.evaluation.compare.run_clip_comparison`); on CPU the
  clips are shrunk to 4 frames of 32×32 px with 20 steps and 2 samples, so the demo ends in a
  minute or two. Without the weights, or with ``--config tiny`` (random weights; ``--config
  wan2.1-1.3b --frames 81 --height 480 --width 832`` on a GPU), it runs the random-weights
  comparison of :func:`models.evaluation.compare.run_comparison`. Both report time per step and in total,
  the speedup, the sparsity actually used (docs/spec.md §6) and the error against dense, and write a JSON
  report and a PNG of one layer's block masks (raster vs hilbert3d) into ``--out-dir``.
* ``synthetic``: synthesizes video-like q/k/v on a latent grid, reorders the tokens (raster vs hilbert3d by
default), scores blocks hierarchically, selects the top key blocks at a few densities,
attends with the reference oracle and prints, per order and density, the kept fraction,
the recall of the layout and the relative error against dense attention.

The synthetic q and k are smooth random fields over (f, h, w): random Fourier features of
the token position, ``phi(x) = sqrt(2/D) cos(omega . x + b)`` with ``omega`` drawn with a
per-head length scale, so that ``phi(x) . phi(y) ~ exp(-|x - y|**2 / (2 l**2))`` and every
token attends mostly to its spatio-temporal neighbourhood, plus independent noise. v is
another smooth field plus noise. Runs on CPU in seconds for the default grid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.evaluation.synthetic import DEFAULT_DENSITIES, DEFAULT_GRID, DEFAULT_ORDERS, format_table, synthetic_report

__all__ = ["main"]

def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,16, got {text!r}") from None


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,0.3, got {text!r}") from None


SMALL_CONFIG_NAMES = ("small", "small-video-dit")


def _use_small_model(config: str, weights: str | None) -> bool:
    """Whether the model mode runs the shipped small video DiT (``--config auto|small``)."""
    if config in SMALL_CONFIG_NAMES:
        return True
    if config != "auto":
        return False
    if weights is not None:
        return True
    from models.evaluation.small_dit import default_weights_path

    return default_weights_path().is_file()


def _run_small_model(args: argparse.Namespace) -> None:
    """Dense vs DFSAttn on the shipped small video DiT: GIF, PSNR/SSIM, masks, JSON."""
    import dataclasses

    from models.evaluation.small_dit import default_weights_path, load_clip_conditioner, load_small_video_dit
    from models.evaluation.compare import format_clip_report, run_clip_comparison

    weights = args.weights or str(default_weights_path())
    model, config = load_small_video_dit(weights)  # verifies the checksum
    conditioner = load_clip_conditioner(weights)
    on_cpu = jax.default_backend() == "cpu"
    clip = config.clip
    if on_cpu:  # dense attention over the trained 16,384 tokens does not fit a CPU demo
        clip = dataclasses.replace(clip, frames=min(clip.frames, 4), height=min(clip.height, 32), width=min(clip.width, 32))
    clip = dataclasses.replace(
        clip, frames=args.frames or clip.frames, height=args.height or clip.height, width=args.width or clip.width
    )
    report = run_clip_comparison(
        model, config, conditioner,
        num_samples=args.samples or (2 if on_cpu else 4),
        steps=args.steps or (20 if on_cpu else 50),
        seed=args.seed, clip=clip, out_dir=args.out_dir, progress=not args.no_progress, weights=weights,
    )  # fmt: skip
    print(format_clip_report(report))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: the model comparison and/or the synthetic attention table."""
    parser = argparse.ArgumentParser(prog="python -m models.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("all", "model", "synthetic"), default="all")
    model_args = parser.add_argument_group("model comparison (--mode all/model)")
    model_args.add_argument(
        "--config", default="auto",
        help="auto (the shipped small video DiT if its weights exist, else tiny), small (the shipped model), "
        "or tiny, wan2.1-1.3b, wan2.1-14b (random weights)",
    )  # fmt: skip
    model_args.add_argument("--weights", default=None, help="weights of the small model (default: the shipped file)")
    model_args.add_argument("--samples", type=int, default=None, help="small model: clip classes sampled (CPU 2, GPU 4)")
    model_args.add_argument(
        "--frames", type=int, default=None,
        help="video frames (random configs: default 17, latent (frames-1)/4+1; small model: clip frames, "
        "default the trained 16, 4 on CPU)",
    )  # fmt: skip
    model_args.add_argument(
        "--height", type=int, default=None,
        help="video height in pixels (random configs: default 256, latent /8; small model: default 64, 32 on CPU)",
    )  # fmt: skip
    model_args.add_argument("--width", type=int, default=None, help="video width in pixels (as --height)")
    model_args.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; small model on CPU 20)")
    model_args.add_argument("--out-dir", default="demo_out", help="where the JSON report, mask PNG and GIF go")
    model_args.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument_group("synthetic attention table (--mode all/synthetic)")
    parser.add_argument("--grid", type=_parse_ints, default=DEFAULT_GRID, help="latent grid F,H,W (default 8,16,16)")
    parser.add_argument(
        "--orders", type=lambda s: tuple(s.split(",")), default=DEFAULT_ORDERS, help="comma-separated token orders"
    )
    parser.add_argument("--densities", type=_parse_floats, default=DEFAULT_DENSITIES, help="comma-separated densities")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--tile-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode in ("all", "model"):
        if _use_small_model(args.config, args.weights):
            _run_small_model(args)
        else:
            from models.evaluation.compare import format_report, run_comparison  # the model stack loads only when asked

            report = run_comparison(
                args.config, args.frames or 17, args.height or 256, args.width or 256, args.steps or 50, args.seed,
                out_dir=args.out_dir, progress=not args.no_progress,
            )  # fmt: skip
            print(format_report(report))
        if args.mode == "model":
            return 0
        print()
    rows = synthetic_report(
        args.grid,
        orders=args.orders,
        densities=args.densities,
        heads=args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        tile_size=args.tile_size,
        seed=args.seed,
    )
    frames, height, width = args.grid
    print(
        f"synthetic video-like q/k/v, grid {frames}x{height}x{width} ({frames * height * width} tokens), "
        f"{args.heads} heads x {args.head_dim}, block {args.block_size}, tile {args.tile_size}, "
        f"backend {jax.default_backend()}"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
