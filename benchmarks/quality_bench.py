"""Quality benchmark: DFSAttn's fidelity to dense sampling, per order, scoring and baseline, on a harness model.

On a small video DiT of ``models/evaluation/weights`` (``--model v1|v2``; ``--random`` for random
weights of the same architecture), every variant samples the same noise for the same classes
(``--samples`` 16: sample ``i`` is photo ``i % 8`` and motion ``i % 5``) with classifier-free
guidance over ``--steps`` (50) Euler steps of the shifted flow schedule:

* ``order``: raster, hilbert2d, block3d, morton3d, hilbert3d (DFS scoring, tile 16) at fixed
  densities 0.3, 0.2, 0.1, 0.05 (no decrement; dense steps and refresh interval as the default)
  and with the default schedule (docs/spec.md §6);
* ``tile``: hilbert3d with tile = block (plain block mean pooling) and tiles 8 and 32, with the
  default schedule and at density 0.1; tile 16 is the ``order`` row;
* ``window``: the static spatio-temporal window (``dfsattn_jax.baselines``) in hilbert3d order at
  each density and with the default schedule's densities;
* ``random``: a uniformly random layout with the same count (hilbert3d order), at each density
  and the default schedule: if it scores near DFS, the model barely uses its attention;
* ``oracle``: top-k of the exact dense block mass (the recall-optimal layout of the same count;
  hilbert3d order, cached like DFS) at density 0.2 and the default schedule: the gap between DFS
  and the oracle is what the scoring's estimate costs, the gap between the oracle and dense what
  the density itself costs;
* ``refresh``: hilbert3d with the mask refreshed at every sparse step instead of cached, with the
  default schedule and at density 0.2.

Measures (docs/spec.md §9) per variant: PSNR and SSIM of the decoded final videos against the
dense videos, per sample with mean, min, max and 95 % confidence interval; recall and attention
error per layer and step, recall per layer and head, the dense attention's concentration (mass of
each query row's top 20 % key blocks) per layer and head, and the dense mass and the missed mass
by distance class of the key (same/other frame × spatial distance); the sparsity used. LPIPS:
not installable without downloading network weights.

Resumable and splittable: ``--variants`` selects variants (comma-separated names, shell patterns
such as ``raster/*``, or ``group:NAME``); results go to ``quality_<tag>.json`` after every
variant, merged with the records already there when the setup is the same (model checksum,
grid, samples, seed, steps, ...; ``--fresh`` starts over). Every call samples the dense
reference first (the PSNR baseline; its final latents are fingerprinted and compared with the
stored run's) and regenerates the markdown and the plots from every record present. Past
``--max-s`` the remaining variants are skipped (listed), so a 10-minute job limit always gets its
files. All variants of a call run in ONE compiled program
(``models.evaluation.quality.QualityRunner``); the records, claims, Markdown and figures come from
``models.evaluation.quality_summary``, ``quality_claims``, ``quality_markdown`` and ``quality_plots``,
the side-by-side page from ``quality_compare``.

Outputs in ``--out-dir`` (default ``benchmarks/results``), ``<tag>`` = ``<model>_<device slug>``
(e.g. ``v2_nvidia_h200``; ``_random`` for random weights, ``_FxHxW`` for a clip size given with
``--frames/--height/--width``, ``smoke_cpu`` for ``--quick``):
``quality_<tag>.json`` (everything), ``quality_<tag>.md`` (tables and the paper's claims
checked), ``quality_density_<tag>.png`` (PSNR with its 95 % interval and recall vs density),
``quality_layers_<tag>.png`` (concentration, recall per layer and order, missed mass by
distance class), ``quality_recall_<tag>.png`` (recall vs step), ``quality_masks_<tag>.png`` (one
layer's block masks, raster vs hilbert3d). Paths in the JSON are repository-relative.

Usage (from the repository root)::

    # GPU, v2 in two calls of about 6 minutes (benchmarks/NOTES.md, "Fidelity v2 runbook"):
    python -m benchmarks.quality_bench --model v2 --variants 'group:order'
    python -m benchmarks.quality_bench --model v2 --variants 'group:tile,group:window,group:random,group:refresh'

    # Both models side by side, from their results files (no sampling): quality_compare_<slug>.md
    python -m benchmarks.quality_bench --compare v2,v1

    # CPU smoke run (a tiny random model, 1024 tokens, 10 steps, fewer densities; about a minute):
    JAX_PLATFORMS=cpu python -m benchmarks.quality_bench --quick

    # A shipped model on CPU-sized clips (4 frames of 32x32 px, 1024 tokens; a few variants):
    JAX_PLATFORMS=cpu python -m benchmarks.quality_bench --model v1 --frames 4 --height 32 --width 32 \
        --steps 12 --samples 2 --variants 'hilbert3d/d=0.2,raster/d=0.2'
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import DFSConfig, default_schedule
from models.common.processor import num_token_blocks
from models.evaluation.clips import BACKGROUND_PHOTOS, MOTIONS, clip_classes
from models.evaluation.codec import latents_to_video
from models.evaluation.media import plot_block_masks
from models.evaluation.quality import QualityRunner, RunOutput, harness_blocks, video_scores
from models.evaluation.quality_claims import check_claims
from models.evaluation.quality_compare import compare_markdown
from models.evaluation.quality_markdown import fmt_value, fmt_with_ci, report_markdown
from models.evaluation.quality_plots import cache_masks, plot_density, plot_layers, plot_recall_steps
from models.evaluation.quality_summary import fingerprint, same_fingerprint, summarize
from models.evaluation.quality_variants import (
    SCORING_WINDOW,
    VARIANT_GROUPS,
    default_variants,
    select_variants,
    variant_plan,
    window_step_scores,
)
from models.evaluation.results import device_name, device_slug, portable, write_json
from models.evaluation.small_dit import (
    SMOKE_HARNESS_CONFIG,
    ClipConditioner,
    SmallDiTConfig,
    get_small_dit,
    load_small_dit,
    random_small_dit,
)
from models.wan.transformer import WanTransformer3DModel

ALL_ORDERS = ("raster", "hilbert2d", "block3d", "morton3d", "hilbert3d")
#: Setup fields that must agree for records of two calls to be merged.
SETUP_KEYS = ("model", "random", "sha256", "token_grid", "samples", "seed", "steps", "solver", "guidance_scale",
              "shift", "block_size", "tile_size", "query_samples", "dense_layers", "measure_every")  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(p) for p in text.split(",") if p.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def _names(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [n for n in names if n not in ORDER_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown orders {bad}; choose from {ORDER_NAMES}")
    return names


def _schedules(text: str) -> tuple[float | None, ...]:
    return tuple(None if p.strip() == "default" else float(p) for p in text.split(",") if p.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("v1", "v2"), default="v1", help="the harness model (default v1)")
    p.add_argument("--random", action="store_true", help="random weights of the model's architecture")
    p.add_argument("--weights", default=None, help="weights file (default: the model's shipped weights)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: a tiny random model, --steps 10 --samples 2 --densities 0.2,0.05 unless given")
    p.add_argument("--frames", type=int, default=None, help="override the clip frames (e.g. a CPU-sized model run)")
    p.add_argument("--height", type=int, default=None, help="override the clip height in pixels")
    p.add_argument("--width", type=int, default=None, help="override the clip width in pixels")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; quick 10)")
    p.add_argument("--samples", type=int, default=None, help="videos per variant (default 16; quick 2)")
    p.add_argument("--variants", default=None,
                   help="run only these: comma-separated names, shell patterns ('raster/*') or 'group:NAME' "
                        f"(groups {', '.join(VARIANT_GROUPS)}); default all")
    p.add_argument("--fresh", action="store_true", help="start a new results file instead of merging into the existing one")
    p.add_argument("--rerun", action="store_true", help="run selected variants even when the results file has them")
    p.add_argument("--orders", type=_names, default=ALL_ORDERS)
    p.add_argument("--densities", type=_floats, default=None, help="fixed densities (default 0.3,0.2,0.1,0.05)")
    p.add_argument("--tiles", type=_ints, default=None,
                   help="scoring tiles besides the DFS tile and tile = block (default 8,32; smoke 4,16)")
    p.add_argument("--tile-densities", type=_schedules, default=None,
                   help="schedules of the tile comparison: 'default' and/or fixed densities (default: default,0.1)")
    p.add_argument("--window-orders", type=_names, default=("hilbert3d",), help="orders of the static window baseline")
    p.add_argument("--random-orders", type=_names, default=("hilbert3d",), help="orders of the random-layout baseline")
    p.add_argument("--oracle-orders", type=_names, default=("hilbert3d",),
                   help="orders of the oracle layout (top-k of the exact dense block mass)")
    p.add_argument("--oracle-densities", type=_schedules, default=None,
                   help="schedules of the oracle layout (default: 0.2,default; quick: default)")
    p.add_argument("--refresh-densities", type=_schedules, default=None,
                   help="schedules of the every-step refresh comparison (default: default,0.2)")
    p.add_argument("--query-samples", type=int, default=256, help="query rows sampled for the probes")
    p.add_argument("--measure-every", type=int, default=1, help="probe every N-th step (and every refresh step)")
    p.add_argument("--timing", choices=("subset", "all", "none"), default="none",
                   help="variants re-run without measurements for timing (the harness is not a speed benchmark)")
    p.add_argument("--budget-s", type=float, default=400.0, help="after this many seconds, skip the timing re-runs")
    p.add_argument("--max-s", type=float, default=530.0,
                   help="after this many seconds, skip the remaining variants (listed in the JSON) and write the results")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--solver", default="euler", choices=("euler", "unipc"))
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file tag (default: <model>_<device slug>, plus _random)")
    p.add_argument("--compare", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=None,
                   help="no sampling: put the results of these models side by side (e.g. v2,v1, the first leads), "
                        "from quality_<model>_<device slug>.json in --out-dir, into quality_compare_<device slug>.md")
    p.add_argument("--compare-slug", default=None, help="device slug of the compared files (default: this machine's)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Setup


def _resize_clip(config: SmallDiTConfig, args) -> SmallDiTConfig:
    """``config`` with the clip size overridden by ``--frames/--height/--width`` (the model is unchanged)."""
    changes = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
    return dataclasses.replace(config, clip=dataclasses.replace(config.clip, **changes)) if changes else config


def _portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as results files may hold it: repository-relative, or only its name when outside
    the repository (results carry no machine paths)."""
    if path is None:
        return None
    try:
        return portable(os.path.abspath(os.fspath(path)))
    except ValueError:
        return pathlib.Path(path).name


def load_setup(args) -> tuple[WanTransformer3DModel, ClipConditioner, SmallDiTConfig, dict[str, Any]]:
    """The model, its conditioner, its config (clip size as asked) and where they came from."""
    if args.quick:
        model, conditioner = random_small_dit(SMOKE_HARNESS_CONFIG)
        return model, conditioner, _resize_clip(SMOKE_HARNESS_CONFIG, args), {"key": "smoke", "weights": None, "sha256": None, "random": True}
    entry = get_small_dit(args.model)
    if args.random:
        model, conditioner = random_small_dit(entry.config)
        source = {"key": args.model, "weights": None, "sha256": None, "random": True,
                  "note": "random weights of the architecture"}  # fmt: skip
        return model, conditioner, _resize_clip(entry.config, args), source
    # one read of the weights, every file's checksum verified
    model, conditioner, config, meta = load_small_dit(pathlib.Path(args.weights) if args.weights else args.model)
    source = {"key": args.model, "weights": _portable_path(meta["weights"]), "sha256": meta["sha256"],
              "random": False, "trained_clip": dataclasses.asdict(config.clip)}  # fmt: skip
    return model, conditioner, _resize_clip(config, args), source


# ----------------------------------------------------------------------------------------------
# Both models side by side


def compare(args) -> dict:
    """``--compare``: reads each model's results file, writes ``quality_compare_<slug>.md``."""
    slug = args.compare_slug or device_slug()
    reports = {}
    for model in args.compare:
        path = os.path.join(args.out_dir, f"quality_{model}_{slug}.json")
        if not os.path.isfile(path):
            raise ValueError(f"--compare: no results file {path} for model {model!r} (run the benchmark first)")
        reports[model] = json.loads(pathlib.Path(path).read_text())
    text = compare_markdown(reports)
    out = os.path.join(args.out_dir, f"quality_compare_{slug}.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return {"markdown": out, "reports": reports}


# ----------------------------------------------------------------------------------------------
# Driver


def _measure_flags(plan, steps: int, every: int) -> np.ndarray:
    """Probe every ``every``-th step and every refresh step."""
    flags = np.arange(steps) % max(1, every) == 0
    if plan is not None:
        flags |= plan.refresh
    return flags


def _load_previous(path: str, setup: dict, fresh: bool) -> dict | None:
    """The results file of an earlier call with the same setup (``None``: none, or ``fresh``)."""
    if fresh or not os.path.isfile(path):
        return None
    previous = json.loads(pathlib.Path(path).read_text())
    old = previous.get("setup", {})
    differ = [k for k in SETUP_KEYS if json.dumps(old.get(k)) != json.dumps(setup.get(k))]
    if differ:
        raise ValueError(
            f"{path} holds results of another setup (differs in {differ}); pass --fresh to start over or --tag for a new file"
        )
    return previous


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The schedules of each comparison (``None``: the default schedule), from the CLI or its defaults."""

    densities: tuple[float, ...]
    other_tiles: tuple[int, ...]
    tile: tuple[float | None, ...]
    refresh: tuple[float | None, ...]
    oracle: tuple[float | None, ...]


def _comparison_schedules(args, block: int) -> Schedules:
    small_grid = block < 128  # CPU sizes
    return Schedules(
        densities=args.densities or ((0.2, 0.05) if args.quick else (0.3, 0.2, 0.1, 0.05)),
        other_tiles=args.tiles if args.tiles is not None else ((4, 16) if small_grid else (8, 32)),
        tile=args.tile_densities or ((None,) if args.quick else (None, 0.1)),
        refresh=args.refresh_densities or ((None,) if args.quick else (None, 0.2)),
        oracle=args.oracle_densities or ((None,) if args.quick else (0.2, None)),
    )


def _output_paths(out_dir: str, tag: str) -> dict[str, str]:
    return {name: os.path.join(out_dir, f"quality_{stem}{tag}{ext}") for name, stem, ext in (
        ("json", "", ".json"), ("markdown", "", ".md"), ("density_png", "density_", ".png"),
        ("layers_png", "layers_", ".png"), ("recall_png", "recall_", ".png"), ("masks_png", "masks_", ".png"))}  # fmt: skip


def _write_figures(report: dict, paths: dict, outputs: dict[str, RunOutput], runner: QualityRunner, block: int) -> None:
    """The density, layer and recall figures, and the block masks when both cached runs are at hand."""
    setup = report["setup"]
    plot_density(report, paths["density_png"])
    plot_layers(report, paths["layers_png"])
    plot_recall_steps(report, paths["recall_png"], ["hilbert3d/default", "raster/default", "hilbert3d/default/refresh-every-step",
                                                    "window-hilbert3d/default", "random-hilbert3d/default",
                                                    f"hilbert3d/tile{block}/default"])  # fmt: skip
    if not all(n in outputs for n in ("raster/default", "hilbert3d/default")):
        return
    num_layers, nk = setup["num_layers"], setup["num_key_blocks"]
    mid = num_layers // 2
    mask_layer = mid if mid in runner.sparse_layers else runner.sparse_layers[0]
    slot = runner.sparse_layers.index(mask_layer)
    last = outputs["hilbert3d/default"].refresh_steps[-1]
    density = float(outputs["hilbert3d/default"].plan.density[last])
    masks = {o: cache_masks(outputs[f"{o}/default"].cache, slot, nk) for o in ("raster", "hilbert3d")}
    plot_block_masks(masks, paths["masks_png"], heads=min(4, setup["num_heads"]),
                     title=f"{setup['model']}: layer {mask_layer} block masks of the last refresh\n(step {last}, density "
                           f"{density:g}, {nk} key blocks), sample 0 ({setup['classes'][0]})")  # fmt: skip


def _print_summary(report: dict) -> None:
    print(f"{'variant':<40} {'sparsity':>8} {'PSNR (dB)':>16} {'SSIM':>7} {'recall':>7}")
    for r in report["variants"]:
        print(f"{r['name']:<40} {r['sparsity']:>8.3f} {fmt_with_ci(r, 'psnr'):>16} {r['ssim_mean']:>7.4f} "
              f"{fmt_value(r.get('recall_mean'), '.4f'):>7}")  # fmt: skip
    for c in report["claims"]:
        print(f"[quality] claim: {c['claim']}: {c['verdict']} ({c['detail']})")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    t_start = time.perf_counter()
    steps = args.steps or (10 if args.quick else 50)
    num_samples = args.samples or (2 if args.quick else 16)
    model, conditioner, config, source = load_setup(args)
    cfg = config.wan
    block, tile = harness_blocks(math.prod(config.token_grid))
    sched = _comparison_schedules(args, block)
    if "hilbert3d" not in args.orders:
        raise ValueError("--orders must include hilbert3d (the tile, window and refresh comparisons refer to it)")
    base = default_schedule(steps, DFSConfig(block_size=block, tile_size=tile))
    variants = default_variants(
        orders=args.orders, densities=sched.densities, tile_size=tile, block_size=block, other_tiles=sched.other_tiles,
        tile_densities=sched.tile, window_orders=args.window_orders, random_orders=args.random_orders,
        oracle_orders=args.oracle_orders, oracle_densities=sched.oracle, refresh_densities=sched.refresh,
    )  # fmt: skip
    selected = select_variants(variants, args.variants)
    latent_shape, grid = config.latent_shape, config.token_grid
    tokens = math.prod(grid)
    nk = num_token_blocks(tokens, block)
    plans = {v.name: variant_plan(v, steps, nk, base) for v in variants}
    max_blocks = max([p.max_blocks for p in plans.values() if p is not None] + [1])
    tiles = tuple(dict.fromkeys((tile, *sched.other_tiles, block)))
    photo, motion = clip_classes(num_samples)
    device = device_name()
    key = source["key"]
    resized = any(getattr(args, k) is not None for k in ("frames", "height", "width"))
    size = f"_{config.clip.frames}x{config.clip.height}x{config.clip.width}" if resized else ""
    tag = args.tag or (f"{key}_{device_slug()}" + ("_random" if source["random"] and key != "smoke" else "") + size)
    setup = {
        "model": cfg.name, "key": key, "random": source["random"], "weights": source["weights"], "sha256": source["sha256"],
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "dim": cfg.dim,
        "clip": dataclasses.asdict(config.clip), "latent_shape": list(latent_shape), "token_grid": list(grid),
        "tokens": tokens, "num_key_blocks": nk, "last_block_tokens": tokens - (nk - 1) * block,
        "block_size": block, "tile_size": tile, "tiles": list(tiles), "max_blocks": max_blocks,
        "samples": num_samples, "classes": [f"{BACKGROUND_PHOTOS[p]}/{MOTIONS[m]}" for p, m in zip(photo, motion)],
        "seed": args.seed, "steps": steps, "solver": args.solver, "guidance_scale": config.guidance_scale,
        "shift": config.sample_shift, "default_schedule": dataclasses.asdict(base),
        "dense_layers": list(base.dense_layers), "orders": list(args.orders), "densities": list(sched.densities),
        "tile_densities": list(sched.tile), "window_orders": list(args.window_orders),
        "random_orders": list(args.random_orders), "refresh_densities": list(sched.refresh),
        "oracle_orders": list(args.oracle_orders), "oracle_densities": list(sched.oracle),
        "query_samples": min(args.query_samples, tokens), "measure_every": args.measure_every,
        "lpips": "not measured: LPIPS needs pretrained network weights that cannot be installed without a download",
    }  # fmt: skip
    os.makedirs(args.out_dir, exist_ok=True)
    paths = _output_paths(args.out_dir, tag)
    previous = _load_previous(paths["json"], setup, args.fresh)
    records = {r["name"]: r for r in (previous or {}).get("variants", [])}
    todo = [v for v in selected if v.name == "dense" or args.rerun or v.name not in records]

    runner = QualityRunner(
        model, latent_shape, block_size=block, tile_sizes=tiles, dense_layers=base.dense_layers,
        max_blocks=max_blocks, num_query_samples=args.query_samples, solver=args.solver, shift=config.sample_shift,
    )  # fmt: skip
    setup["sparse_layers"] = list(runner.sparse_layers)
    noise = jax.random.normal(jax.random.key(args.seed), (num_samples,) + latent_shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(num_samples)
    guidance = config.guidance_scale
    print(f"[quality] {device}: {cfg.name} ({'random' if source['random'] else 'trained'} weights), grid {grid} = "
          f"{tokens} tokens, {nk} blocks of {block}; {num_samples} samples x {steps} steps; {len(todo)} of "
          f"{len(variants)} variants to run ({len(records)} in {paths['json']}); tiles {tiles}, K_max {max_blocks}",
          flush=True)  # fmt: skip
    compile_s = runner.warmup(noise, text, negative, num_steps=steps)
    print(f"[quality] compiled in {compile_s:.1f} s", flush=True)
    window_cache: dict = {}
    capacity = runner.capacity(steps)
    outputs: dict[str, RunOutput] = {}
    dense_video = dense_latents = None
    error_floor = (previous or {}).get("attn_error_floor", float("nan"))
    dense_mismatch = (previous or {}).get("dense_mismatch")
    timing = {"none": set(), "all": {v.name for v in variants}}.get(args.timing)
    if timing is None:
        timing = {v.name for v in variants if v.group in ("dense", "refresh") or (v.group == "order" and v.order == "hilbert3d")}
    skipped_variants: list[str] = []
    calls = list((previous or {}).get("calls", []))
    call = {"variants": [], "compile_s": compile_s, "device": device}
    keep_cache = {"raster/default", "hilbert3d/default"}

    def report_of(complete_names: set[str]) -> dict:
        ordered = [records[v.name] for v in variants if v.name in records]
        missing = [v.name for v in variants if v.name not in complete_names]
        report = {
            "device": device, "backend": jax.default_backend(), "jax_version": jax.__version__,
            "python": platform.python_version(), "dtype": str(model.dtype), "setup": setup,
            "attn_error_floor": error_floor, "dense_fingerprint": (previous or {}).get("dense_fingerprint") or fingerprint(dense_latents),
            "dense_mismatch": dense_mismatch, "calls": calls + [call], "variants": ordered,
            "complete": not missing, "missing_variants": missing,
        }  # fmt: skip
        report["claims"] = check_claims(report)
        return report

    for v in todo:
        t0 = time.perf_counter()
        if v.sparse and t0 - t_start > args.max_s:
            skipped_variants.append(v.name)
            continue
        plan = plans[v.name]
        static = None
        if v.scoring == SCORING_WINDOW:
            perm, _ = runner.order_arrays(v.order)
            static = window_step_scores(grid, perm, plan, capacity, block_size=block, cache=window_cache)
        kwargs = dict(num_steps=steps, plan=plan, order=v.order, scoring=runner.scoring_index(v, tile),
                      static_scores=static, guidance_scale=guidance, random_seed=args.seed)  # fmt: skip
        out = runner(noise, text, negative, measure=_measure_flags(plan, steps, args.measure_every), **kwargs)
        video = latents_to_video(out.latents, config.codec)
        if dense_video is None:
            if v.sparse:
                raise ValueError("the first variant must be the dense reference")
            dense_video, dense_latents = video, out.latents
            stored = (previous or {}).get("dense_fingerprint")
            if stored is not None and not same_fingerprint(fingerprint(out.latents), stored):
                dense_mismatch = f"call {len(calls) + 1}: dense latents differ from the stored fingerprint"
                print(f"[quality] WARNING: {dense_mismatch}", flush=True)
            if "dense" in records and not args.rerun:
                call["variants"].append("dense (reference only)")
                continue
            error_floor = float(np.nanmean(out.error))  # the dense kernel's own rounding against float32
        scores = video_scores(video, dense_video)
        rec = summarize(v, out, scores, dense_latents, runner.sparse_layers, cfg.num_layers, base.dense_layers)
        if v.name in timing and time.perf_counter() - t_start < args.budget_s:
            rec["time_s"] = runner(noise, text, negative, measure=False, **kwargs).time_s
        records[v.name] = rec
        call["variants"].append(v.name)
        if v.name in keep_cache:
            outputs[v.name] = out
        write_json(paths["json"], report_of(set(records)))  # what is done so far survives a killed run
        print(f"[quality] {v.name:<40} sparsity {rec['sparsity']:.3f}  PSNR {fmt_with_ci(rec, 'psnr'):>14} dB  "
              f"SSIM {rec['ssim_mean']:.4f}  recall {fmt_value(rec.get('recall_mean'), '.4f')}  "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip

    call["total_s"] = time.perf_counter() - t_start
    call["skipped_over_max_s"] = skipped_variants
    call["compiles"] = runner.trace_count
    report = report_of(set(records))
    if skipped_variants:
        print(f"[quality] over --max-s: variants NOT run: {skipped_variants}", flush=True)
    _write_figures(report, paths, outputs, runner, block)
    if not os.path.isfile(paths["masks_png"]):
        paths["masks_png"] = None
    report["files"] = {k: _portable_path(p) for k, p in paths.items()}
    write_json(paths["json"], report)
    with open(paths["markdown"], "w") as f:
        f.write(report_markdown(report))
    report["files"] = paths
    print(f"[quality] done in {call['total_s']:.1f} s; {len(report['variants'])} of {len(variants)} variants in "
          f"{paths['json']}; missing: {len(report['missing_variants'])}", flush=True)  # fmt: skip
    _print_summary(report)
    return report


if __name__ == "__main__":
    main()
