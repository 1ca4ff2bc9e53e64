"""End-to-end demo: ``python -m models.demo``.

Two parts (``--mode all`` runs both, the default):

* ``model``: a Wan2.1-architecture video DiT samples the same noise dense and with DFSAttn.
  By default (``--config auto``) it is the small video DiT trained here and shipped in
  ``models/evaluation/weights`` (:mod:`models.evaluation.small_dit`), when its weights are present: a few clip classes
  (``--samples``) are sampled, decoded, compared (PSNR/SSIM of the DFSAttn video against the dense
  one) and written side by side as a GIF, and as an MP4 when an encoder is installed
  (:func:`models.evaluation.compare.run_clip_comparison`). On CPU the demo scales down, and says
  so in its output and JSON report: the clips shrink from the trained 16×64×64 to 4 frames of
  32×32 px (``CPU_CLIP``), with 20 steps instead of 50 and 2 samples instead of 4, so that it
  ends in a few minutes; since the model was trained at 16×64×64 its PSNR there is lower than
  the GPU figure of README (``GPU_REFERENCE``). Without the weights, or with ``--config tiny``
  (random weights; ``--config wan2.1-1.3b --frames 81 --height 480 --width 832`` on a GPU), it runs the random-weights
  comparison of :func:`models.evaluation.compare.run_comparison`. Both time ``--repeats`` runs
  of dense and of DFS after one warm-up compile each and report the median time per step and in
  total (the JSON keeps every run), the speedup of the medians, the sparsity actually used
  (docs/spec.md §6) and the error against dense, and write a JSON report and a PNG of one
  layer's block masks (raster vs hilbert3d, with a kept/skipped key) into ``--out-dir``.
* ``synthetic``: synthesizes video-like q/k/v on a latent grid, reorders the tokens (raster vs hilbert3d by
default), scores blocks hierarchically, selects the top key blocks at a few densities,
attends with the reference oracle and prints, per order and density, the kept fraction,
the recall of the layout and the relative error against dense attention.

Every printed table or report is followed by a legend: one line per column or field.

The synthetic q and k are smooth random fields over (f, h, w): random Fourier features of
the token position, ``phi(x) = sqrt(2/D) cos(omega . x + b)`` with ``omega`` drawn with a
per-head length scale, so that ``phi(x) . phi(y) ~ exp(-|x - y|**2 / (2 l**2))`` and every
token attends mostly to its spatio-temporal neighbourhood, plus independent noise. v is
another smooth field plus noise. Runs on CPU in seconds for the default grid.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import jax

from models.cli_args import renamed
from models.evaluation.reports import format_legend
from models.evaluation.synthetic import DEFAULT_DENSITIES, DEFAULT_GRID, DEFAULT_ORDERS, format_table, synthetic_report

__all__ = ["CPU_CLIP", "GPU_REFERENCE", "SYNTHETIC_LEGEND", "cpu_scale_note", "main"]

#: Largest clip (frames, height, width in px) the small model samples on CPU: dense attention
#: over the trained 16×64×64 clips (16,384 tokens) does not fit a CPU demo.
CPU_CLIP = (4, 32, 32)
#: Denoising steps and samples of the small model on CPU and on a GPU.
CPU_STEPS, GPU_STEPS = 20, 50
CPU_SAMPLES, GPU_SAMPLES = 2, 4
#: Timed runs of each of dense and DFS (after one warm-up compile); the report gives their median.
DEFAULT_REPEATS = 3
#: The shipped small model's demo on a GPU at its trained size, as README reports it
#: (benchmarks/results/demo/compare_small-video-dit.json).
GPU_REFERENCE = {
    "source": "README (benchmarks/results/demo/compare_small-video-dit.json)",
    "device": "NVIDIA H200",
    "config": "small-video-dit",
    "clip": [16, 64, 64],
    "tokens": 16384,
    "steps": 50,
    "samples": 4,
    "psnr_db": 25.5,
    "ssim": 0.81,
    "speedup": 1.51,
    "sparsity": 0.675,
}
#: One line per column of the synthetic table (:func:`~models.evaluation.synthetic.format_table`).
SYNTHETIC_LEGEND = (
    ("order", "token order before blocking: raster (frame by frame, row by row) or hilbert3d (a 3D Hilbert "
     "curve over f, h, w)"),
    ("density", "fraction of key blocks asked for per query block"),
    ("blocks", "key blocks each query block keeps (the density times the key blocks, at least 1)"),
    ("kept", "fraction of all (query block, key block) pairs computed"),
    ("recall", "attention (softmax) mass inside the kept blocks, mean over sampled queries and heads; "
     "1 = nothing missed"),
    ("rel.err", "||block-sparse output - dense output|| / ||dense output|| of the attention"),
)
#: The options that set the arguments the library checks, per mode: a ``ValueError`` naming one
#: becomes a command-line error naming the option (the demo does not check them itself).
MODEL_OPTIONS = {"repeats": "--repeats", "frames": "--frames", "height": "--height", "width": "--width"}
SYNTHETIC_OPTIONS = {"grid": "--grid", "orders": "--orders", "density": "--densities", "block_size": "--block-size",
                     "tile_size": "--tile-size"}  # fmt: skip


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


def _size(dims: Sequence[int]) -> str:
    return "×".join(str(int(d)) for d in dims)


def cpu_scale_note(trained_clip, clip, codec, patch_size, *, steps: int, samples: int, user: dict) -> dict:
    """What the CPU demo scales down and what to expect, for the report (``scaled_down``).

    ``trained_clip``/``clip`` are the trained and the sampled :class:`~models.evaluation.clips.ClipConfig`;
    ``user`` says which of ``clip``, ``steps``, ``samples`` the command line set (those are
    the user's choice, not a scale-down).
    """
    from models.evaluation.codec import token_grid

    trained = (trained_clip.frames, trained_clip.height, trained_clip.width)
    used = (clip.frames, clip.height, clip.width)
    tokens_trained = math.prod(token_grid(trained_clip, codec, patch_size))
    tokens_used = math.prod(token_grid(clip, codec, patch_size))
    items: dict = {}
    parts = []
    if used != trained and not user.get("clip"):
        items["clip"] = {"trained": list(trained), "used": list(used), "tokens_trained": tokens_trained,
                         "tokens_used": tokens_used}  # fmt: skip
        parts.append(
            f"clips {_size(trained)} -> {_size(used)} px (frames×height×width; {tokens_trained:,} -> "
            f"{tokens_used:,} tokens)"
        )
    if not user.get("steps") and steps != GPU_STEPS:
        items["steps"] = {"gpu_default": GPU_STEPS, "used": steps}
        parts.append(f"{GPU_STEPS} -> {steps} steps")
    if not user.get("samples") and samples != GPU_SAMPLES:
        items["samples"] = {"gpu_default": GPU_SAMPLES, "used": samples}
        parts.append(f"{GPU_SAMPLES} -> {samples} samples")
    if parts:
        summary = "on CPU the demo scales down: " + ", ".join(parts) + " (--frames/--height/--width/--steps/--samples set them)"
    else:
        summary = "on CPU, at the sizes given on the command line (nothing scaled down)"
    ref = GPU_REFERENCE
    expect = (
        f"expect: the model was trained at {_size(trained)}"
        + (f", so at {_size(used)} DFSAttn's PSNR/SSIM against dense are lower than at the trained size" if used != trained else "")
        + f", and CPU timings say little about GPU speed; README's GPU figure ({ref['device']}, {_size(ref['clip'])}, "
        f"{ref['steps']} steps, {ref['samples']} samples): PSNR {ref['psnr_db']} dB, SSIM {ref['ssim']}, "
        f"speedup {ref['speedup']}x"
    )
    return {"device": "cpu", "summary": summary, "expect": expect, "items": items, "trained_clip": list(trained),
            "gpu_reference": dict(ref)}  # fmt: skip


def _run_small_model(args: argparse.Namespace) -> None:
    """Dense vs DFSAttn on the shipped small video DiT: GIF (+ MP4), PSNR/SSIM, masks, JSON."""
    import dataclasses

    from models.evaluation.small_dit import default_weights_path, load_small_dit
    from models.evaluation.compare import run_clip_comparison
    from models.evaluation.reports import format_clip_report

    weights = args.weights or str(default_weights_path())
    model, conditioner, config, _ = load_small_dit(weights)  # one read, checksums verified
    on_cpu = jax.default_backend() == "cpu"
    clip = config.clip
    if on_cpu:  # dense attention over the trained 16,384 tokens does not fit a CPU demo
        clip = dataclasses.replace(
            clip, frames=min(clip.frames, CPU_CLIP[0]), height=min(clip.height, CPU_CLIP[1]),
            width=min(clip.width, CPU_CLIP[2]),
        )  # fmt: skip
    clip = dataclasses.replace(
        clip, frames=args.frames or clip.frames, height=args.height or clip.height, width=args.width or clip.width
    )
    samples = args.samples or (CPU_SAMPLES if on_cpu else GPU_SAMPLES)
    steps = args.steps or (CPU_STEPS if on_cpu else GPU_STEPS)
    notes = {}
    if on_cpu:
        user = {"clip": bool(args.frames or args.height or args.width), "steps": bool(args.steps),
                "samples": bool(args.samples)}  # fmt: skip
        notes["scaled_down"] = cpu_scale_note(
            config.clip, clip, config.codec, model.config.patch_size, steps=steps, samples=samples, user=user
        )
    print(
        f"{model.config.name}: sampling {samples} clip classes of {_size((clip.frames, clip.height, clip.width))} px, "
        f"{steps} steps, dense and with DFSAttn, {args.repeats} timed run(s) each after one warm-up compile"
        + (" (scaled down on CPU: see the note below)" if notes.get("scaled_down", {}).get("items") else ""),
        flush=True,
    )
    report = run_clip_comparison(
        model, config, conditioner, num_samples=samples, steps=steps, seed=args.seed, clip=clip,
        out_dir=args.out_dir, progress=not args.no_progress, weights=weights, repeats=args.repeats, notes=notes,
    )  # fmt: skip
    print(format_clip_report(report))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: the model comparison and/or the synthetic attention table.

    The library checks the values (sizes, repeats, densities, orders, block and tile sizes); a
    value it refuses exits with status 2 and one line naming the option.
    """
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
    model_args.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS,
        help=f"timed runs of dense and of DFS after one warm-up compile; times are their median (default {DEFAULT_REPEATS})",
    )  # fmt: skip
    model_args.add_argument("--out-dir", default="demo_out", help="where the JSON report, mask PNG, GIF and MP4 go")
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
        _as_option_error(parser, MODEL_OPTIONS, _run_model, args)
        if args.mode == "model":
            return 0
        print()
    _as_option_error(parser, SYNTHETIC_OPTIONS, _run_synthetic, args)
    return 0


def _as_option_error(parser: argparse.ArgumentParser, options: dict[str, str], run, args: argparse.Namespace) -> None:
    """Runs ``run(args)``; a ``ValueError`` naming one of ``options``' arguments exits as a
    command-line error naming the option (``parser.error``: usage, one line, status 2)."""
    try:
        run(args)
    except ValueError as err:
        message = renamed(str(err), options)
        if message is None:
            raise
        parser.error(message)


def _run_model(args: argparse.Namespace) -> None:
    """The model comparison: the shipped small video DiT, or a random-weights config."""
    if _use_small_model(args.config, args.weights):
        _run_small_model(args)
        return
    from models.evaluation.compare import run_comparison  # the model stack loads only when asked
    from models.evaluation.reports import format_report

    report = run_comparison(
        args.config, args.frames or 17, args.height or 256, args.width or 256, args.steps or 50, args.seed,
        out_dir=args.out_dir, progress=not args.no_progress, repeats=args.repeats,
    )  # fmt: skip
    print(format_report(report))


def _run_synthetic(args: argparse.Namespace) -> None:
    """The synthetic attention table with its legend."""
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
    print(format_legend(SYNTHETIC_LEGEND))


if __name__ == "__main__":
    sys.exit(main())
