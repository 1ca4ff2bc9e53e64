"""Train a small video DiT of the quality harness (:mod:`models.evaluation.small_dit`) on synthetic clips.

Models (``--model``, :data:`models.evaluation.small_dit.SMALL_DIT_MODELS`): ``v1`` (dim 256, 6
layers, 4 heads, 16×64×64-px clips, 16,384 tokens), ``v2`` (dim 512, 4 layers, 8 heads of 64,
16×60×108-px clips, a 16×30×54 = 25,920-token grid like Wan2.1's), ``--smoke`` a tiny CPU model.
Each is conditioned through the cross-attention on a learned embedding of the clip's photo and
motion class (:class:`models.evaluation.small_dit.ClipConditioner`, 2 + 2 tokens of width 64).

The objective, the stages, the optimiser and the learning-rate schedule are
:mod:`models.evaluation.training`; the two checkpoint kinds (a run resumes from the newer one)
are :mod:`models.evaluation.training_checkpoints`:

* **full** (``--out``/``checkpoint.safetensors``): float32 params, AdamW moments and the step,
  every ``--checkpoint-every`` steps and at the end; it stays on the machine;
* **compact** (``--carry-out DIR``, read back with ``--carry-in DIR``): the params only, in
  ``--carry-dtype`` (bfloat16, shards of at most 16 MiB), with the step, the configs and the
  histories in the metadata: what travels between GPU calls. Resuming from it restarts the AdamW
  moments, so the learning rate ramps back up over ``TrainConfig.rewarm`` steps (100). float32 params
  (59 MB for v2) plus moments would not fit the 64 MiB tree next to the repository.

Training runs with float32 master weights and bfloat16 activations on GPU (float32 on CPU). The
clips are drawn with the seed ``(seed, step)``, so a resumed run sees exactly the data it would
have.

Measures (:mod:`models.evaluation.learning`): the held-out flow-matching loss on a fixed set at
fixed noise levels every ``--eval-every`` steps; at the end of the last stage, ``--eval-samples``
dense 50-step samples with their PSNR to the nearest of ``--eval-candidates`` real clips of their
class, the same for held-out real clips (the ceiling), and the photo each sample is nearest to.

Outputs (``--out``): ``checkpoint.safetensors``, ``losses.json``, ``heldout.json``,
``loss.png`` (training loss per stage and held-out loss), ``samples.png`` / ``samples.gif``
(real clips vs samples of the same classes), ``train_summary.json``; with ``--results DIR``
copies of the pictures and summaries (for the README); with ``--export PATH``, once the last
stage is done, the shipped weights (bfloat16 safetensors, shards of at most 16 MiB, ``PATH.sha256``).

Usage (from the repository root; needs the package installed: ``pip install -e .``)::

    # CPU smoke test (tiny model, 2 stages of 4-frame 16×16 clips; about a minute):
    JAX_PLATFORMS=cpu python -m benchmarks.train_small --smoke --out /tmp/train_smoke

    # v2 on the H200 in resumable calls (benchmarks/NOTES.md, "Fidelity v2 runbook"):
    python -m benchmarks.train_small --model v2 --out out/train_v2 --time-limit 500 \\
        --carry-in carry/train_v2 --carry-out $OUT/ckpt --results $OUT/results \\
        --export $OUT/weights/small_video_dit_v2.safetensors

    # The shipped v1 model (2,400 steps × batch 8 on one H200, 6.4 min):
    python -m benchmarks.train_small --model v1 --steps 2400 --batch 8 --out out/train_small \\
        --results benchmarks/results/train_small --export models/evaluation/weights/small_video_dit.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.common.files import atomic_write, atomic_write_text
from models.evaluation.clips import BACKGROUND_PHOTOS, MOTIONS, load_photo_bank, sample_clip_params
from models.evaluation.harness_weights import save_small_video_dit, weights_files
from models.evaluation.learning import HeldoutSet, learning_report
from models.evaluation.media import plot_sample_grid, write_side_by_side_gif
from models.evaluation.results import device_name, portable, write_json
from models.evaluation.small_dit import SmallDiTConfig
from models.evaluation.training import (
    SmallDiT,
    Stage,
    TrainConfig,
    learning_rate,
    make_optimizer,
    make_train_step,
    recipe,
    single_stage,
)
from models.evaluation.training_checkpoints import (
    CHECKPOINT,
    checkpoint_info,
    compact_info,
    load_checkpoint,
    load_compact,
    save_checkpoint,
    save_compact,
)


# ----------------------------------------------------------------------------------------------
# Stages


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``"END:BATCH:FxHxW,..."`` (ends increasing) → stages, e.g. ``"2000:32:4x60x108,3100:8:16x60x108"``."""
    stages = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            end, batch, size = part.split(":")
            frames, height, width = (int(x) for x in size.lower().split("x"))
            stages.append(Stage(int(end), int(batch), frames, height, width))
        except ValueError as err:
            raise ValueError(f"--stages entry {part!r} must be END:BATCH:FxHxW (e.g. 2000:32:4x60x108): {err}") from None
    if not stages:
        raise ValueError(f"--stages must name at least one stage, got {text!r}")
    ends = [s.end for s in stages]
    if ends != sorted(set(ends)):
        raise ValueError(f"--stages ends must increase, got {ends}")
    return tuple(stages)


# ----------------------------------------------------------------------------------------------
# Pictures


def plot_losses(losses: list[tuple[int, float]], path: pathlib.Path, title: str, *,
                heldout: Sequence[tuple[int, float]] = (), stages: Sequence[Stage] = ()) -> None:  # fmt: skip
    """The training loss per step (and its running mean), the held-out loss, the stage boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in losses])
    values = np.array([v for _, v in losses])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(steps, values, lw=0.5, alpha=0.4, label="training loss per step")
    if len(values) >= 10:
        k = max(5, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"training, mean of {k}")
    if heldout:
        ax.plot([s for s, _ in heldout], [v for _, v in heldout], "o-", ms=3, lw=1.2, color="black",
                label="held-out (final clip size)")  # fmt: skip
    for stage in stages[:-1]:
        ax.axvline(stage.end, color="grey", ls=":", lw=1)
    for i, stage in enumerate(stages):
        start = stages[i - 1].end if i else 0
        ax.annotate(f"{stage.frames}×{stage.height}×{stage.width}, batch {stage.batch}", ((start + stage.end) / 2, 1.0),
                    xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE of ε − x0)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9, pad=14 if stages else 6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:  # keeps the suffix: matplotlib picks the format from it
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def save_sample_pictures(
    real: np.ndarray, generated: np.ndarray, captions: Sequence[str], png: pathlib.Path, gif: pathlib.Path
) -> None:
    """PNG: for each class a row of real frames and a row of generated frames; GIF: side by side,
    frames doubled when narrower than 96 px (v1's 64×64 clips are doubled, v2's 60×108 kept: a
    GIF of photographs is large, and results travel under the device's size limits)."""
    plot_sample_grid(real, generated, png, captions=captions)
    scale = 2 if real.shape[3] < 96 else 1
    write_side_by_side_gif(real, generated, gif, titles=("real clip", "sample"), captions=captions, scale=scale)


# ----------------------------------------------------------------------------------------------
# Driver


def _portable_path(path: pathlib.Path) -> str:
    """``path`` as results may hold it: repository-relative, or only its name when outside the
    repository (no machine paths in results files)."""
    try:
        return portable(pathlib.Path(path).resolve())
    except ValueError:
        return pathlib.Path(path).name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_small", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("v1", "v2"), default="v1", help="the registered model to train (default v1)")
    p.add_argument("--smoke", action="store_true", help="tiny model and clips, few steps (CPU smoke test)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default out/train_<model>)")
    p.add_argument("--stages", default=None,
                   help="END:BATCH:FxHxW,... (default: the model's recipe, see recipe())")
    p.add_argument("--steps", type=int, default=None, help="one stage of this many steps at the model's clip size")
    p.add_argument("--batch", type=int, default=None, help="batch of that one stage (default: the recipe's last)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out loss every N steps (default 250; smoke 10; 0: only at the end)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop training (and save) after this many seconds since the start")
    p.add_argument("--carry-out", type=pathlib.Path, default=None,
                   help="also write the compact checkpoint (params only, shards <= 16 MiB) here")
    p.add_argument("--carry-in", type=pathlib.Path, default=None,
                   help="resume from the compact checkpoint here when it is newer than --out's full one")
    p.add_argument("--carry-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps of the samples (default 50; smoke 2)")
    p.add_argument("--eval-samples", type=int, default=None, help="samples scored at the end (default 16; smoke 2)")
    p.add_argument("--eval-candidates", type=int, default=None,
                   help="real clips per class for the nearest-clip PSNR (default 256; smoke 4)")
    p.add_argument("--show-samples", type=int, default=8, help="classes in samples.png / samples.gif")
    p.add_argument("--no-samples", action="store_true", help="no samples and no end-of-training evaluation")
    p.add_argument("--export", type=pathlib.Path, default=None, help="write the shipped weights (+ .sha256) here")
    p.add_argument("--results", type=pathlib.Path, default=None,
                   help="also copy loss.png, samples.png/.gif, losses.json and train_summary.json here")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    return p.parse_args(argv)


def _train_config(args: argparse.Namespace) -> tuple[str, SmallDiTConfig, TrainConfig]:
    name = "smoke" if args.smoke else args.model
    config, cfg = recipe(name)
    if args.stages is not None and (args.steps is not None or args.batch is not None):
        raise ValueError("give either --stages or --steps/--batch, not both")
    stages = cfg.stages
    if args.stages is not None:
        stages = parse_stages(args.stages)
    elif args.steps is not None or args.batch is not None:
        stages = single_stage(config, args.steps or cfg.steps, args.batch or cfg.stages[-1].batch)
    changes = {"stages": stages, "seed": args.seed}
    if args.lr is not None:
        changes["lr"] = args.lr
    if args.warmup is not None:
        changes["warmup"] = args.warmup
    return name, config, dataclasses.replace(cfg, **changes)


def _resume(args, out: pathlib.Path, params, opt_state, config, cfg) -> tuple[Any, Any, int, dict, int | None, str | None]:
    """``(params, opt_state, step, histories, rewarm_from, source)`` from the newer checkpoint;
    ``source`` is ``"full"``, ``"compact"`` or ``None`` (a fresh start)."""
    history: dict[str, list] = {"losses": [], "heldout": []}
    if args.fresh:
        return params, opt_state, 0, history, None, None
    ckpt = out / CHECKPOINT
    info = checkpoint_info(ckpt) if ckpt.exists() else None
    full = None if info is None else int(info["step"])
    carried = compact_info(args.carry_in)
    compact = None if carried is None else int(carried["step"])
    if full is not None and (compact is None or full >= compact):
        params, opt_state, step = load_checkpoint(ckpt, params, opt_state, config)
        rewarm = info.get("rewarm_from") or None
        for key in history:
            file = out / f"{key}.json"
            if file.exists():
                history[key] = [(int(s), float(v)) for s, v in json.loads(file.read_text()) if s <= step]
        return params, opt_state, step, history, None if rewarm is None else int(rewarm), "full"
    if compact is not None:
        params, step, history = load_compact(args.carry_in, params, config)
        return params, opt_state, step, history, step, "compact"
    return params, opt_state, 0, history, None, None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Tiny CPU runs are dominated by XLA:CPU's LLVM optimisation (3× faster compiles at
        # level 0, same speed for these shapes). Takes effect only if no backend exists yet.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    name, config, cfg = _train_config(args)
    out = args.out or pathlib.Path(f"out/train_{name}")
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    eval_every = args.eval_every if args.eval_every is not None else (10 if args.smoke else 250)
    print(
        f"device {device_name()}; model {config.wan.name} (dim {config.wan.dim}, {config.wan.num_layers} layers, "
        f"{config.wan.num_heads} heads); final latent {config.latent_shape}, tokens {math.prod(config.token_grid)}; "
        f"stages {', '.join(s.text() for s in cfg.stages)}; activations {jnp.dtype(dtype).name}",
        flush=True,
    )

    bank = load_photo_bank(config.clip.bank_size)
    images = jnp.asarray(bank.images)
    bundle = SmallDiT(config, rngs=nnx.Rngs(cfg.seed), dtype=dtype)
    graphdef, params = nnx.split(bundle, nnx.Param)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    params, opt_state, start, history, rewarm_from, source = _resume(args, out, params, opt_state, config, cfg)
    if source == "full":
        print(f"resumed from the full checkpoint {out / CHECKPOINT} at step {start}", flush=True)
    elif source == "compact":
        print(f"resumed from the compact checkpoint in {args.carry_in} at step {start} "
              f"(optimizer moments restarted, learning rate re-warmed over {cfg.rewarm} steps)", flush=True)  # fmt: skip
    base_key = jax.random.key(cfg.seed)
    heldout = HeldoutSet(config, bank=bank, num_clips=4 if args.smoke else 16, num_sigmas=2 if args.smoke else 8,
                         batch=2 if args.smoke else 8, seed=cfg.seed)  # fmt: skip
    carry_dtype = jnp.dtype(args.carry_dtype)

    heldout_results: dict[int, dict] = {}  # step -> held-out result measured in this process

    def evaluate(step: int) -> None:
        bundle = nnx.merge(graphdef, params)
        heldout_results[step] = heldout(bundle.transformer, bundle.conditioner)
        loss = heldout_results[step]["loss"]
        history["heldout"] = [h for h in history["heldout"] if h[0] != step] + [(step, loss)]
        print(f"step {step}: held-out loss {loss:.4f}", flush=True)

    def checkpoint(step: int) -> None:
        save_checkpoint(out / CHECKPOINT, params, opt_state, step, config, cfg, rewarm_from=rewarm_from)
        for key, values in history.items():
            atomic_write_text(out / f"{key}.json", json.dumps(values))
        # A finished run that exports its weights needs no compact checkpoint (and the GPU
        # machine returns at most 8 files: the export and the results use them).
        if args.carry_out is not None and not (step >= cfg.steps and args.export is not None):
            save_compact(args.carry_out, params, step, config, cfg, history, dtype=carry_dtype)

    t_loop = time.perf_counter()
    pending: list[tuple[int, jax.Array]] = []
    step = start
    stopped_early = False
    stage_stats: dict[int, dict[str, float]] = {}
    current, train_step, t_steady, stage_start = None, None, None, start

    def drain() -> None:  # the device losses of the steps since the last drain, into the history
        history["losses"].extend((s, float(v)) for s, v in pending)
        pending.clear()

    while step < cfg.steps:
        index = cfg.stage_index(step)
        stage = cfg.stages[index]
        clip = stage.clip(config.clip)
        if index != current:
            current, stage_start = index, step
            train_step = make_train_step(graphdef, config, clip, tx, cfg)
            t_stage = time.perf_counter()
            print(f"stage {index}: steps {step}-{stage.end - 1}, batch {stage.batch}, clips {clip.frames}x{clip.height}x{clip.width} px", flush=True)
        clip_params = sample_clip_params((cfg.seed, step), stage.batch, clip)
        lr = jnp.float32(learning_rate(step, cfg, rewarm_from))
        params, opt_state, loss = train_step(params, opt_state, images, clip_params, jax.random.fold_in(base_key, step), lr)
        pending.append((step, loss))
        step += 1
        if step == stage_start + 1:
            jax.block_until_ready(loss)
            first = time.perf_counter() - t_stage
            stage_stats[index] = {"first_step_s": first, "steps": 0, "seconds": 0.0}
            t_steady = time.perf_counter()
            print(f"step {step}: loss {float(loss):.4f} (first step of stage {index} incl. compile {first:.1f} s)", flush=True)
        flush = step % args.log_every == 0 or step == cfg.steps or step == stage.end
        if flush:
            drain()
            stats = stage_stats[index]
            stats["steps"], stats["seconds"] = step - stage_start - 1, time.perf_counter() - t_steady
            rate = stats["steps"] / max(stats["seconds"], 1e-9)
            recent = np.mean([v for _, v in history["losses"][-args.log_every :]])
            print(f"step {step}: loss {recent:.4f} ({rate:.2f} steps/s, lr {float(lr):.2e})", flush=True)
        if eval_every and step % eval_every == 0 and step < cfg.steps:
            drain()
            evaluate(step)
        if step % args.checkpoint_every == 0 and step < cfg.steps:
            drain()
            checkpoint(step)
        if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit and step < cfg.steps:
            print(f"time limit reached at step {step}", flush=True)
            stopped_early = True
            break
    drain()
    if current is not None and t_steady is not None:
        stats = stage_stats[current]
        stats["steps"], stats["seconds"] = step - stage_start - 1, time.perf_counter() - t_steady
    complete = step >= cfg.steps
    if complete and step > start and (not history["heldout"] or history["heldout"][-1][0] != step):
        evaluate(step)
    if step > start:
        checkpoint(step)
    train_s = time.perf_counter() - t_loop
    if history["losses"]:
        plot_losses(history["losses"], out / "loss.png", f"{config.wan.name}: {step} steps", heldout=history["heldout"],
                    stages=cfg.stages)  # fmt: skip

    bundle = nnx.merge(graphdef, params)
    summary: dict[str, Any] = dict(
        device=device_name(),
        model=config.wan.name,
        parameters=int(num_params),
        tokens=math.prod(config.token_grid),
        token_grid=list(config.token_grid),
        stages=[dataclasses.asdict(s) for s in cfg.stages],
        steps=step,
        complete=complete,
        stopped_early=stopped_early,
        resumed_from=source,
        start_step=start,
        rewarm_from=rewarm_from,
        stage_timing={str(i): {**s, "steps_per_s": s["steps"] / s["seconds"] if s["seconds"] > 0 else None}
                      for i, s in stage_stats.items()},  # fmt: skip
        train_s=train_s,
        final_loss=float(np.mean([v for _, v in history["losses"][-100:]])) if history["losses"] else None,
        heldout=history["heldout"][-1][1] if history["heldout"] else None,
        heldout_history=history["heldout"],
    )
    if complete and args.export is not None:  # first: the weights are safe before the evaluation runs
        digests = save_small_video_dit(
            args.export, bundle.transformer, bundle.conditioner, config,
            metadata={"steps": str(step), "final_loss": str(summary["final_loss"]), "train": cfg.to_json()},
        )  # fmt: skip
        summary["export"] = _portable_path(args.export)
        summary["sha256"] = digests
        summary["export_bytes"] = sum(os.path.getsize(f) for f in weights_files(args.export))
    if complete and not args.no_samples:
        t0 = time.perf_counter()
        num = args.eval_samples or (2 if args.smoke else 16)
        report, videos = learning_report(
            bundle.transformer, bundle.conditioner, config, num_samples=num,
            num_steps=args.sample_steps or (2 if args.smoke else 50),
            num_candidates=args.eval_candidates or (4 if args.smoke else 256),
            photo_candidates=2 if args.smoke else 32,
            seed=cfg.seed, heldout=heldout, heldout_result=heldout_results.get(step),
        )  # fmt: skip
        shown = min(args.show_samples, num)
        captions = [f"{BACKGROUND_PHOTOS[p]} / {MOTIONS[m]}" for p, m in report["classes"][:shown]]
        save_sample_pictures(videos["real"][:shown], videos["samples"][:shown], captions, out / "samples.png", out / "samples.gif")
        summary["learning"] = report
        summary["sample_s"] = time.perf_counter() - t0
        summary["sample_steps"] = report["num_steps"]
    summary["total_s"] = time.perf_counter() - t_start
    write_json(out / "train_summary.json", summary)
    if args.results is not None:
        for file in ("loss.png", "samples.png", "samples.gif", "losses.json", "train_summary.json"):
            if (out / file).is_file():
                with atomic_write(args.results / file) as tmp:
                    shutil.copyfile(out / file, tmp)
    brief = {k: summary[k] for k in ("model", "steps", "complete", "final_loss", "heldout", "train_s", "total_s")}
    if "learning" in summary:
        learn = summary["learning"]
        brief["nearest_psnr"] = learn["samples"]["nearest_psnr_summary"]["mean"]
        brief["nearest_psnr_real"] = learn["real"]["nearest_psnr_summary"]["mean"]
        brief["photo_accuracy"] = learn["samples"]["photo_accuracy"]
        brief["sharpness_ratio"] = learn["sharpness_ratio"]
    print(json.dumps(brief, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
