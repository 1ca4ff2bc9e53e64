"""Schedule search: the fastest DFS schedule whose fidelity stays within 0.2 dB of the default's.

Fidelity comes from a harness model (``--model v2``, the small video DiT at a Wan-shaped grid):
PSNR of each schedule's decoded videos against the dense videos from the same noise, mean over
``--samples`` (16) samples. Speed comes from Wan2.1-1.3B: the schedule's 50 steps composed from
the per-step times ``benchmarks/e2e_bench.py`` measured on the H200 (``--e2e``, default
``benchmarks/results/e2e_nvidia_h200.json``; :mod:`models.evaluation.speed`: interpolated linearly in the kept-block count between the
measured densities 0.3 / 0.2 / 0.1, extrapolated below 0.1; always-dense layers at the measured
cost of a sparse layer).

Search space (a :class:`~dfsattn_jax.schedule.DFSConfig` each): dense steps, the first refresh's
density and its decrement per refresh (the per-refresh densities), the refresh interval and the
always-dense layers. On the harness, always-dense layers are layers that keep every key block
(``QualityRunner(dense_layers=())`` with full layouts on request), so every candidate runs in one
compiled program. The same layer indices count as dense in the Wan composition; since one layer
is a quarter of the 4-layer harness but a thirtieth of Wan2.1-1.3B, the harness overstates what
an extra dense layer buys: candidates with more dense layers than ``--max-dense-layers`` (1) are
evaluated only when asked and never chosen.

Procedure, on two disjoint sets of samples (noise seeds ``--choose-seed`` and ``--report-seed``):

1. **choose**: the dense reference, the default schedule and every preset of
   :data:`dfsattn_jax.schedule.SCHEDULE_PRESETS`; then a best-first descent: each round
   takes the fastest schedule evaluated so far whose mean PSNR is within ``--tolerance`` (0.2 dB)
   of the default's and that it has not expanded yet (best first; presets are starting points
   too), and evaluates every neighbour of it that composes faster: first the single steps (one
   step along one axis of the ladders below), then the trades (a faster step on one axis paid for
   by a slower step on another, e.g. fewer dense steps with a denser mask); it stops when every qualifying schedule is expanded or after
   ``--max-candidates`` evaluations. The winner is the fastest qualifying schedule evaluated.
2. **report**: the dense reference, the default, the winner and the Pareto front of the choose
   set, on the other seed: the winner's PSNR difference to the default, paired per sample, with its
   95 % interval, is the reported result.

Resumable: results go to ``schedule_search_<model>_<device slug>.json`` after every evaluation
and a rerun reuses them (same setup), so ``--stage choose`` and ``--stage report`` can run in
separate GPU calls; past ``--max-s`` it stops and writes what it has. Writes the JSON, a markdown
table and ``schedule_search_<...>.png`` (composed speedup vs PSNR for every evaluated schedule,
the Pareto front, the default and the winner marked, the 0.2 dB tolerance and the 2× target).

Usage (from the repository root)::

    python -m benchmarks.schedule_search --model v2 --stage choose     # ~6 min on one H200 (24 schedules)
    python -m benchmarks.schedule_search --model v2 --stage report     # ~2 min
    JAX_PLATFORMS=cpu python -m benchmarks.schedule_search --quick     # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfsattn_jax.schedule import SCHEDULE_PRESETS, DFSConfig, default_schedule, plan_schedule
from models.common.processor import num_token_blocks
from models.evaluation import quality as Q
from models.evaluation.clips import clip_classes
from models.evaluation.codec import latents_to_video
from models.evaluation.fidelity import paired_spread, spread
from models.evaluation.results import device_name, device_slug, write_json
from models.evaluation.speed import StepTimes, compose
from models.evaluation.tables import markdown_table

#: The per-step times the speed is composed from by default: Wan2.1-1.3B at 480p on the H200 (e2e_bench.py).
E2E_RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "e2e_nvidia_h200.json"

#: The ladders of the greedy descent (values per axis, in order; a move is one step either way).
DENSE_STEPS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16)
DENSITIES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
DECREMENTS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15)
INTERVALS = (4, 5, 6, 8, 10, 12, 16, 20)


def _layers(text: str) -> tuple[tuple[int, ...], ...]:
    """``"0;none;0,3"`` → ``((0,), (), (0, 3))``."""
    out = []
    for part in text.split(";"):
        part = part.strip()
        out.append(() if part in ("", "none") else tuple(int(x) for x in part.split(",")))
    return tuple(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("v1", "v2"), default="v2", help="the harness model (default v2)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny random model, 8 steps, 2 samples")
    p.add_argument("--stage", choices=("choose", "report", "all"), default="all")
    p.add_argument("--samples", type=int, default=None, help="samples per seed set (default 16; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; quick 8)")
    p.add_argument("--choose-seed", type=int, default=0, help="noise seed of the samples the search chooses on")
    p.add_argument("--report-seed", type=int, default=1, help="noise seed of the samples the result is reported on")
    p.add_argument("--tolerance", type=float, default=0.2, help="PSNR within this many dB of the default's (mean)")
    p.add_argument("--max-candidates", type=int, default=24, help="schedules evaluated on the choose set, at most")
    p.add_argument("--dense-layers-options", type=_layers, default=None,
                   help="always-dense layer sets searched, ';'-separated (default '0;none'; 'none' = no dense layer)")
    p.add_argument("--max-dense-layers", type=int, default=1, help="never choose a schedule with more dense layers")
    p.add_argument("--e2e", default=str(E2E_RESULTS),
                   help="per-step times (benchmarks/e2e_bench.py JSON; default benchmarks/results/e2e_nvidia_h200.json)")
    p.add_argument("--report-front", type=int, default=4, help="Pareto-front schedules also evaluated on the report set")
    p.add_argument("--max-s", type=float, default=540.0, help="stop evaluating after this many seconds")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file tag (default <model>_<device slug>)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Candidates


def candidate_name(config: DFSConfig) -> str:
    layers = ",".join(str(i) for i in config.dense_layers) or "none"
    return (f"dense{config.dense_steps}-d{config.density:g}-dec{config.density_decrement:g}"
            f"-every{config.refresh_interval}-layers{layers}")  # fmt: skip


def _step(ladder: Sequence, value, direction: int):
    """The ladder value next to ``value`` in ``direction`` (``None`` at an end; ``value`` off the
    ladder moves to the nearest rung on that side)."""
    values = sorted(ladder)
    if direction > 0:
        bigger = [v for v in values if v > value + 1e-9]
        return bigger[0] if bigger else None
    smaller = [v for v in values if v < value - 1e-9]
    return smaller[-1] if smaller else None


_AXES = (("dense_steps", DENSE_STEPS), ("density", DENSITIES), ("density_decrement", DECREMENTS),
         ("refresh_interval", INTERVALS))


def _moves(config: DFSConfig, layer_options: Sequence[tuple[int, ...]]) -> list[tuple[str, dict]]:
    """``(axis, changed fields)`` for every one-step move from ``config`` (before validation)."""
    out = []
    for field, ladder in _AXES:
        for direction in (-1, 1):
            value = _step(ladder, getattr(config, field), direction)
            if value is not None:
                out.append((field, {field: value}))
    out += [("dense_layers", {"dense_layers": tuple(layers)}) for layers in layer_options
            if tuple(layers) != tuple(config.dense_layers)]  # fmt: skip
    return out


def _apply(config: DFSConfig, changes: dict) -> DFSConfig | None:
    try:
        return dataclasses.replace(config, **changes)
    except ValueError:  # e.g. an interval that DFSConfig rejects
        return None


def neighbours(config: DFSConfig, layer_options: Sequence[tuple[int, ...]]) -> list[DFSConfig]:
    """Every valid schedule one ladder step away from ``config`` along one axis."""
    return [c for c in (_apply(config, ch) for _, ch in _moves(config, layer_options)) if c is not None]


def trades(config: DFSConfig, layer_options: Sequence[tuple[int, ...]], speedup) -> list[DFSConfig]:
    """Every valid schedule two steps away from ``config`` that trades: one step that composes
    faster than ``config`` with one step that composes slower, on two different axes (for
    example fewer dense steps paid for by a denser mask). ``speedup(config) -> float`` is the
    composed speed. Two steps that are both faster are left out: each alone already costs
    fidelity, so together they cost more."""
    base = speedup(config)
    moves = [(axis, ch, cfg) for axis, ch in _moves(config, layer_options)
             if (cfg := _apply(config, ch)) is not None]  # fmt: skip
    faster = [(a, ch) for a, ch, c in moves if speedup(c) > base]
    slower = [(a, ch) for a, ch, c in moves if speedup(c) <= base]
    out = [_apply(config, {**f, **s}) for af, f in faster for as_, s in slower if af != as_]
    return [c for c in out if c is not None]


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points ``(name, psnr, speedup)`` that no other point beats in both (best PSNR first)."""
    front = []
    for name, psnr, speed in points:
        dominated = any((p2 >= psnr and s2 >= speed) and (p2 > psnr or s2 > speed) for _, p2, s2 in points)
        if not dominated:
            front.append((psnr, name))
    return [name for _, name in sorted(front, reverse=True)]


# ----------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Runs schedules on the harness model for one seed set and scores them against dense."""

    def __init__(self, runner: Q.QualityRunner, conditioner, config, *, samples: int, seed: int, steps: int):
        self.runner, self.config, self.steps, self.seed = runner, config, steps, seed
        photo, motion = clip_classes(samples)
        self.noise = jax.random.normal(jax.random.key(seed), (samples,) + config.latent_shape, jnp.float32)
        self.text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
        self.negative = conditioner.unconditional(samples)
        self._dense = None

    def _run(self, plan, dense_layers=()):
        out = self.runner(self.noise, self.text, self.negative, num_steps=self.steps, plan=plan, order="hilbert3d",
                          scoring=0, guidance_scale=self.config.guidance_scale, measure=False, dense_layers=dense_layers)  # fmt: skip
        return out, latents_to_video(out.latents, self.config.codec)

    def dense(self) -> np.ndarray:
        if self._dense is None:
            self._dense = self._run(None)[1]
        return self._dense

    def evaluate(self, config: DFSConfig) -> dict[str, Any]:
        """PSNR/SSIM per sample of ``config`` against dense, and the run's sparsity and time."""
        dense = self.dense()
        plan = plan_schedule(dataclasses.replace(config, dense_layers=()), self.steps, self.runner.num_key_blocks)
        layers = tuple(i for i in config.dense_layers if i in self.runner.sparse_layers)
        t0 = time.perf_counter()
        out, video = self._run(plan, layers)
        scores = Q.video_scores(video, dense)
        return {"psnr": [float(x) for x in scores["psnr"]], "ssim": [float(x) for x in scores["ssim"]],
                "psnr_mean": float(np.mean(scores["psnr"])), "ssim_mean": float(np.mean(scores["ssim"])),
                "harness_sparsity": out.sparsity, "seconds": time.perf_counter() - t0}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Report


#: Columns of the schedule tables.
COLUMNS = ("schedule", "composed speedup", "composed s", "PSNR (dB)", "vs default (paired)", "SSIM", "within tolerance")


def _row(name: str, r: dict, base: dict | None, speed: dict, tolerance: float) -> list[str]:
    """The cells of :data:`COLUMNS` for schedule ``name`` (``r``: its result; ``base``: the default's)."""
    s = spread(r["psnr"])
    d = None if base is None else paired_spread(r["psnr"], base["psnr"])
    diff = "–" if d is None else f"{d['mean']:+.2f} ± {d['ci95'] or 0:.2f}"
    ok = "–" if base is None else ("yes" if r["psnr_mean"] >= base["psnr_mean"] - tolerance else "no")
    return [name, f"{speed['speedup']:.3f}×", f"{speed['dfs_s']:.2f}", f"{s['mean']:.2f} ± {s['ci95'] or 0:.2f}", diff,
            f"{r['ssim_mean']:.4f}", ok]  # fmt: skip


def markdown(state: dict) -> str:
    meta = state["setup"]
    lines = [f"# Schedule search on {meta['model']} ({state['device']})", "",
             f"- fidelity: {meta['samples']} samples × {meta['steps']} Euler steps on the harness model, grid "
             f"{meta['token_grid']} ({meta['num_key_blocks']} blocks); PSNR vs dense from the same noise, mean ± 95% CI",
             f"- speed: 50 steps composed from {state['speed_source']} (linear in kept blocks between the measured "
             "densities 0.3/0.2/0.1, extrapolated below 0.1); dense run "
             f"{state['dense_s']:.2f} s",
             f"- rule: the fastest schedule with mean PSNR ≥ default − {meta['tolerance']} dB on the choose set (seed "
             f"{meta['choose_seed']}), at most {meta['max_dense_layers']} always-dense layer(s); reported on seed {meta['report_seed']}",
             ""]  # fmt: skip
    for set_name in ("choose", "report"):
        results = state.get(set_name, {})
        base = results.get("default")
        if not results:
            continue
        rows = [_row(name, results[name], base, state["speed"][name], meta["tolerance"])
                for name in sorted(results, key=lambda n: -state["speed"][n]["speedup"])]  # fmt: skip
        lines += [f"## {set_name} set (seed {meta[set_name + '_seed']})", ""] + markdown_table(COLUMNS, rows) + [""]
    winner = state.get("winner")
    if winner:
        cfg = state["configs"][winner]
        lines += [f"**Winner**: `{winner}`: {state['speed'][winner]['speedup']:.3f}× composed on Wan2.1-1.3B "
                  f"(default {state['speed']['default']['speedup']:.3f}×).", "",
                  "Preset line for `dfsattn_jax/schedule.py`:", "", "```python",
                  f"DFSConfig(density={cfg['density']}, density_decrement={cfg['density_decrement']}, "
                  f"dense_steps={cfg['dense_steps']}, refresh_interval={cfg['refresh_interval']}, "
                  f"dense_layers={tuple(cfg['dense_layers'])})", "```", ""]  # fmt: skip
        rep = state.get("report", {})
        if winner in rep and "default" in rep:
            d = paired_spread(rep[winner]["psnr"], rep["default"]["psnr"])
            ok = rep[winner]["psnr_mean"] >= rep["default"]["psnr_mean"] - meta["tolerance"]
            lines += [f"On the report set: {d['mean']:+.2f} ± {d['ci95'] or 0:.2f} dB vs the default "
                      f"({'within' if ok else 'NOT within'} {meta['tolerance']} dB).", ""]  # fmt: skip
    lines += ["## Search path", ""] + [f"- {step}" for step in state.get("path", [])] + [""]
    return "\n".join(lines)


def plot(state: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = state["setup"]
    sets = [s for s in ("choose", "report") if state.get(s)]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.2 * len(sets), 4.6), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        results = state[set_name]
        names = [n for n in results if n != "dense"]
        xs = np.array([results[n]["psnr_mean"] for n in names])
        ys = np.array([state["speed"][n]["speedup"] for n in names])
        es = np.array([spread(results[n]["psnr"])["ci95"] or 0.0 for n in names])
        ax.errorbar(xs, ys, xerr=es, fmt="o", color="grey", ms=4, alpha=0.6, label="evaluated schedules", capsize=2)
        front = pareto_front([(n, results[n]["psnr_mean"], state["speed"][n]["speedup"]) for n in names])
        fx = [results[n]["psnr_mean"] for n in front]
        fy = [state["speed"][n]["speedup"] for n in front]
        ax.plot(fx, fy, "-", color="C0", lw=1.2, label="Pareto front")
        if "default" in results:
            base = results["default"]["psnr_mean"]
            ax.plot([base], [state["speed"]["default"]["speedup"]], "*", ms=14, color="C1", label="default schedule")
            ax.axvline(base - meta["tolerance"], color="C1", ls="--", lw=1, label=f"default − {meta['tolerance']} dB")
        winner = state.get("winner")
        if winner in results:
            ax.plot([results[winner]["psnr_mean"]], [state["speed"][winner]["speedup"]], "D", ms=9, color="C3",
                    label=f"chosen: {winner}")  # fmt: skip
        ax.axhline(2.0, color="k", ls=":", lw=1, label="2× target")
        ax.set_xlabel("PSNR vs dense (dB), harness model, mean ± 95% CI")
        ax.set_ylabel("composed speedup over dense, Wan2.1-1.3B (50 steps)")
        ax.set_title(f"{set_name} set (seed {meta[set_name + '_seed']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"schedule search: {meta['model']} fidelity, {state['speed_source']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Driver


def _setup(args):
    """``(model, conditioner, config, key, checksums)``: the harness model (or the smoke model for ``--quick``)."""
    from models.evaluation.small_dit import SMOKE_HARNESS_CONFIG, load_small_dit, random_small_dit

    if args.quick:
        return *random_small_dit(SMOKE_HARNESS_CONFIG), SMOKE_HARNESS_CONFIG, "smoke", None
    model, conditioner, config, meta = load_small_dit(args.model)  # one read, checksums verified
    return model, conditioner, config, args.model, meta["sha256"]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    model, conditioner, config, key, checksums = _setup(args)
    steps = args.steps or (8 if args.quick else 50)
    samples = args.samples or (2 if args.quick else 16)
    tokens = math.prod(config.token_grid)
    block, tile = Q.harness_blocks(tokens)
    nk = num_token_blocks(tokens, block)
    layer_options = args.dense_layers_options or ((0,), ())
    times = StepTimes.from_e2e(args.e2e)
    tag = args.tag or f"{key}_{device_slug()}"
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"schedule_search_{tag}")
    setup = {"model": config.wan.name, "key": key, "sha256": checksums, "token_grid": list(config.token_grid),
             "num_key_blocks": nk, "samples": samples, "steps": steps, "choose_seed": args.choose_seed,
             "report_seed": args.report_seed, "tolerance": args.tolerance, "max_dense_layers": args.max_dense_layers,
             "block_size": block, "tile_size": tile}  # fmt: skip
    state: dict[str, Any] = {"setup": setup, "choose": {}, "report": {}, "configs": {}, "speed": {}, "path": []}
    if not args.fresh and os.path.isfile(stem + ".json"):
        old = json.loads(open(stem + ".json").read())
        if old.get("setup") != json.loads(json.dumps(setup)):
            raise ValueError(f"{stem}.json holds a search of another setup; pass --fresh or --tag")
        state.update({k: old.get(k, state[k]) for k in ("choose", "report", "configs", "speed")})
    state.update(device=device_name(), speed_source=times.source, dense_s=compose(DFSConfig(), times)["dense_s"])

    runner = Q.QualityRunner(model, config.latent_shape, block_size=block, tile_sizes=(tile,), dense_layers=(),
                             max_blocks=nk, shift=config.sample_shift, num_query_samples=1)  # fmt: skip
    evaluators = {name: Evaluator(runner, conditioner, config, samples=samples, seed=seed, steps=steps)
                  for name, seed in (("choose", args.choose_seed), ("report", args.report_seed))}  # fmt: skip

    def harness(config: DFSConfig) -> DFSConfig:  # the 50-step schedule on the harness's block size
        scaled = default_schedule(steps, config) if steps != 50 else config
        return dataclasses.replace(scaled, block_size=block, tile_size=tile)

    def register(config: DFSConfig, name: str | None = None) -> str:
        name = name or candidate_name(config)
        state["configs"][name] = {**dataclasses.asdict(config), "dense_layers": list(config.dense_layers)}
        state["speed"][name] = {k: v for k, v in compose(config, times).items() if k != "steps_s"}
        return name

    out_of_time = False

    def evaluate(set_name: str, name: str) -> dict | None:
        nonlocal out_of_time
        if name in state[set_name]:
            return state[set_name][name]
        if time.perf_counter() - t_start > args.max_s:
            out_of_time = True
            return None
        cfg = DFSConfig(**{**state["configs"][name], "dense_layers": tuple(state["configs"][name]["dense_layers"])})
        result = evaluators[set_name].evaluate(harness(cfg))
        state[set_name][name] = result
        write_json(stem + ".json", state)
        print(f"[search] {set_name:7s} {name:<48} {state['speed'][name]['speedup']:.3f}x  PSNR {result['psnr_mean']:.2f} dB "
              f"({result['seconds']:.1f} s)", flush=True)  # fmt: skip
        return result

    print(f"[search] {device_name()}: {config.wan.name}, grid {config.token_grid} ({nk} blocks), {samples} samples x "
          f"{steps} steps; speed from {times.source}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    runner.warmup(evaluators["choose"].noise, evaluators["choose"].text, evaluators["choose"].negative, num_steps=steps)
    print(f"[search] compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    register(DFSConfig(), "default")
    # "wan2.1" is the baseline registered as "default"; "hunyuan-video" is the other family's schedule.
    presets = [register(p.config, f"preset:{n}") for n, p in SCHEDULE_PRESETS.items()
               if n not in ("wan2.1", "hunyuan-video")]  # fmt: skip
    eligible = lambda n: len(state["configs"][n]["dense_layers"]) <= args.max_dense_layers  # noqa: E731
    if args.stage in ("choose", "all"):
        default = evaluate("choose", "default")
        for name in presets:
            evaluate("choose", name)
        expanded: set[str] = set()

        def qualifies(name: str) -> bool:
            result = state["choose"].get(name)
            return (result is not None and eligible(name)
                    and result["psnr_mean"] >= default["psnr_mean"] - args.tolerance)  # fmt: skip

        while default is not None and not out_of_time and len(state["choose"]) < args.max_candidates:
            seeds = [n for n in state["choose"] if qualifies(n) and n not in expanded]
            if not seeds:
                state["path"].append("every qualifying schedule expanded; stop")
                break
            current = max(seeds, key=lambda n: state["speed"][n]["speedup"])
            expanded.add(current)
            cfg = DFSConfig(**{**state["configs"][current], "dense_layers": tuple(state["configs"][current]["dense_layers"])})

            def faster_first(configs: Sequence[DFSConfig]) -> list[str]:
                """The names of ``configs`` that compose faster than ``current`` (registered), fastest first."""
                names = [n for n in dict.fromkeys(register(c) for c in configs)
                         if state["speed"][n]["speedup"] > state["speed"][current]["speedup"]]  # fmt: skip
                return sorted(names, key=lambda n: -state["speed"][n]["speedup"])

            singles = faster_first(neighbours(cfg, layer_options))
            # single steps first (fastest first), then the trades (two steps, one of them slower)
            swaps = trades(cfg, layer_options, lambda c: compose(c, times)["speedup"])
            faster = singles + [n for n in faster_first(swaps) if n not in singles]
            found = []
            for name in faster:
                if name not in state["choose"] and len(state["choose"]) >= args.max_candidates:
                    break
                if evaluate("choose", name) is None:
                    break
                if qualifies(name):
                    found.append(name)
            best = max(found, key=lambda n: state["speed"][n]["speedup"], default=None)
            state["path"].append(f"expand {current} ({state['speed'][current]['speedup']:.3f}×): {len(faster)} faster "
                                 f"neighbours, {len(found)} within {args.tolerance} dB"
                                 + (f", fastest {best} ({state['speed'][best]['speedup']:.3f}×)" if best else ""))  # fmt: skip
    choose = state["choose"]
    if "default" in choose:
        ok = [n for n in choose if eligible(n) and choose[n]["psnr_mean"] >= choose["default"]["psnr_mean"] - args.tolerance]
        state["winner"] = max(ok, key=lambda n: state["speed"][n]["speedup"]) if ok else None
    if args.stage in ("report", "all") and state.get("winner"):
        names = [n for n in choose if n != "dense"]
        front = pareto_front([(n, choose[n]["psnr_mean"], state["speed"][n]["speedup"]) for n in names])
        for name in ["default", state["winner"]] + [n for n in front if n not in ("default", state["winner"])][: args.report_front]:
            if evaluate("report", name) is None:
                break
    state["complete"] = not out_of_time
    state["total_s"] = time.perf_counter() - t_start
    write_json(stem + ".json", state)
    plot(state, stem + ".png")
    with open(stem + ".md", "w") as f:
        f.write(markdown(state))
    print(markdown(state))
    return state


if __name__ == "__main__":
    main()
