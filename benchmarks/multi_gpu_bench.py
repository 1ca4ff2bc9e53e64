"""Wan2.1 over several GPUs with ``jax.sharding``: per-step times dense and DFS, 1 vs N devices.

Default: the Wan2.1-14B architecture with random bf16 weights at 720x1280, 81 frames
(21x45x80 = 75,600 tokens), batch 2 (classifier-free guidance). Each variant (a device count
and a parallel mode: ``guidance``, ``heads`` or ``both``, see :mod:`models.common.parallel`)
runs the real sampler (:class:`models.sampling.loop.Sampler`, one jitted program for the whole
loop, DFS backend) with explicit step plans, and reads each step's time from the loop's
per-step callbacks (``SampleResult.step_s``, the device finishing a step):

- ``dense``: the DFS backend's dense steps (cuDNN attention; what the schedule's first 12
  steps run); ``dense-backend`` (optional) times the ``dense`` backend in a program of its own;
- ``refresh``: scoring + top-k selection + block-sparse attention at ``--density``;
- ``sparse``: block-sparse attention with the cached layouts.

The first ``--warmup`` steps of a variant's first run are dropped (the compile is outside the
step times anyway); every later kind runs in the same compiled program. From the per-step
times it composes the default 50-step schedule (12 dense steps, refreshes at 12/24/36 with
densities 0.3/0.2/0.1): a sparse step at density ``d`` is interpolated linearly between the
measured sparse step at ``--density`` and the dense step at 1.0 (attention cost is linear in
the visited blocks); a refresh adds the measured refresh-minus-sparse time.

Each record (one per variant): devices, mode, per-step ms, scaling vs one device (when a
one-device record of the same problem is in the same output, the ``--baseline`` file, or the
files given to ``--table``), the composed schedule, the predicted all-to-all bytes, compile
time and memory per device (``device.memory_stats()``: peak and in use, per process, so run
one variant per process for clean peaks). Results are printed as soon as measured and the
JSON (a list of records) is rewritten after every measurement, so a run killed at its limit
keeps what it measured.

No silent wrong results: a record any of whose runs ends with non-finite latents gets
``"valid": false`` and its ``invalid_reason`` (NaN block scores are never selected, so such a
run's sparse steps visit fewer blocks and look fast); its table row says ``INVALID``, it gets no
scaling and no composed schedule, is no one-device baseline, a line starting ``!!!`` is printed,
and the script exits with status 3 once the JSON is written (``--table`` too).

GPU (what the lead runs: ``bash benchmarks/multi_gpu_session.sh``)::

    python -m benchmarks.multi_gpu_bench --devices 1 --out $OUT/multi_1.json
    python -m benchmarks.multi_gpu_bench --devices 2 --mode guidance --out $OUT/multi_2g.json
    python -m benchmarks.multi_gpu_bench --devices 2 --mode heads --out $OUT/multi_2h.json
    python -m benchmarks.multi_gpu_bench --table $OUT/multi_*.json

CPU smoke test (tiny config, host devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python -m \\
        benchmarks.multi_gpu_bench --config tiny --frames 9 --height 64 --width 64 \\
        --block-size 16 --tile-size 4 --devices 1,2,4 --mode guidance,heads,both --out /tmp/multi.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import memory_stats, run_record
from dfsattn_jax.layout import blocks_for_density
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule
from models.common.parallel import Parallelism, make_parallel
from models.common.processor import AttentionBackend, num_token_blocks
from models.evaluation.results import write_json
from models.evaluation.speed import plan_step_times
from models.evaluation.tables import markdown_table
from models.sampling.loop import Sampler
from models.wan.config import default_dtype, get_config, latent_shape, token_grid
from models.wan.transformer import WanTransformer3DModel

KINDS = ("dense", "refresh", "sparse", "dense-backend")
#: Nominal NVLink 4 bandwidth per direction per H200, and the share an all-to-all reaches.
NVLINK_GBPS = 450.0
ALL_TO_ALL_EFFICIENCY = 0.65


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="wan2.1-14b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--devices", default="1", help="device counts, comma-separated (1: no parallelism)")
    p.add_argument("--mode", default="guidance,heads",
                   help="parallel modes for counts > 1, comma-separated: guidance, heads, both")
    p.add_argument("--steps-kinds", default="dense,refresh,sparse", help=f"comma-separated, of {KINDS}")
    p.add_argument("--density", type=float, default=0.2, help="density of the refresh and sparse steps")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of a variant")
    p.add_argument("--iters", type=int, default=2, help="measured steps per kind (median)")
    p.add_argument("--steps", type=int, default=50, help="length of the composed default schedule")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=16)
    p.add_argument("--order", default="hilbert3d")
    p.add_argument("--max-density", type=float, default=0.5, help="mask-cache capacity, as the sampler's default")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: bf16 on GPU, f32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file of the records (a list), rewritten after each measurement")
    p.add_argument("--baseline", default=None, help="a JSON of this script with the one-device record")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the table of these result files (scaling computed across them) and exit")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.steps_kinds.split(",") if k]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"--steps-kinds: unknown {bad}; choose from {KINDS}")
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    return args


def variants(devices: str, modes: str) -> list[Parallelism | None]:
    """The parallelisms to run: one device once, every mode for each larger count."""
    out: list[Parallelism | None] = []
    for count in (int(c) for c in devices.split(",") if c):
        if count == 1:
            out.append(None)
        else:
            out.extend(make_parallel(count, mode) for mode in modes.split(",") if mode)
    return out


def step_plan(kinds: list[str], nk: int, num_blocks: int) -> SchedulePlan:
    """A plan running the given step kinds in order (``refresh`` before any ``sparse``)."""
    sparse = np.asarray([k != "dense" for k in kinds])
    refresh = np.asarray([k == "refresh" for k in kinds])
    return SchedulePlan(
        sparse=sparse,
        refresh=refresh,
        density=np.where(sparse, num_blocks / nk, 1.0),
        num_blocks=np.where(sparse, num_blocks, nk).astype(np.int32),
        max_blocks=num_blocks if sparse.any() else 0,
        num_key_blocks=nk,
    )


def memory_per_device(parallel: Parallelism | None) -> list[dict]:
    devices = list(parallel.mesh.devices.flat) if parallel is not None else [jax.devices()[0]]
    out = []
    for dev in devices:
        stats = memory_stats(dev)
        out.append({
            "device": dev.id,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
            "in_use_gib": stats.get("bytes_in_use", 0) / 2**30 or None,
        })
    return out


def all_to_all_bytes_per_step(cfg, batch: int, num_tokens: int, itemsize: int, parallel: Parallelism | None) -> int:
    """Bytes one device sends per denoiser evaluation in head-parallel mode (docs: NOTES).

    Per self-attention layer, four all-to-alls (q, k, v in; the output back), each sending
    ``(h-1)/h`` of the local ``[B/g, L/h, N, D]`` block.
    """
    if parallel is None or parallel.heads == 1:
        return 0
    g, h = parallel.guidance, parallel.heads
    local = (batch // g) * (num_tokens // h) * cfg.num_heads * cfg.head_dim * itemsize
    return cfg.num_layers * 4 * local * (h - 1) // h


def compose(per_step: dict, plan: SchedulePlan, density: float) -> dict | None:
    """The schedule's time from per-step times (linear in density between ``density`` and 1)."""
    if not all(k in per_step for k in ("dense", "sparse", "refresh")):
        return None
    t_dense, t_sparse, t_refresh = per_step["dense"], per_step["sparse"], per_step["refresh"]

    def sparse_at(d: float) -> float:
        return t_sparse + (d - density) / (1.0 - density) * (t_dense - t_sparse)

    total = float(sum(plan_step_times(
        plan, t_dense,
        lambda s: sparse_at(float(plan.density[s])) + (t_refresh - t_sparse) * bool(plan.refresh[s]),
    )))  # fmt: skip
    dense_total = plan.num_steps * per_step.get("dense-backend", t_dense)
    return {"steps": plan.num_steps, "dense_s": dense_total / 1e3, "dfs_s": total / 1e3,
            "speedup": dense_total / total, "refresh_steps": list(plan.refresh_steps),
            "mean_sparse_density": float(np.mean(plan.density[plan.sparse])) if plan.sparse.any() else 1.0}


def problem_sizes(cfg, frames: int, height: int, width: int, block_size: int, density: float) -> dict:
    """The latent shape ``[C, F, H, W]``, token grid, tokens, key blocks ``nk`` and the blocks kept
    at ``density`` of a video of ``frames x height x width`` pixels."""
    shape = latent_shape(cfg, frames, height, width)
    grid = token_grid(cfg, shape[1:])
    num_tokens = math.prod(grid)
    nk = num_token_blocks(num_tokens, block_size)
    return {"shape": shape, "grid": grid, "tokens": num_tokens, "nk": nk, "num_blocks": blocks_for_density(density, nk)}


def random_model(cfg, dtype, seed: int) -> WanTransformer3DModel:
    """The architecture ``cfg`` with random weights in ``dtype`` (parameters too)."""
    model = WanTransformer3DModel(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype)
    jax.block_until_ready(nnx.state(model))
    return model


def random_inputs(cfg, shape: tuple[int, ...], dtype, seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Seeded ``(noise [1, C, F, H, W] float32, text, negative text [1, text_len, text_dim] dtype)``."""
    rng = np.random.default_rng(seed)
    noise = jnp.asarray(rng.standard_normal((1, *shape), np.float32))
    text = jnp.asarray(rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32), dtype)
    negative = jnp.asarray(rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32), dtype)
    return noise, text, negative


def check_validity(record: dict) -> bool:
    """Marks ``record`` invalid when one of its sampler runs ended with non-finite latents.

    Sets ``record["valid"]`` and, for an invalid record, ``record["invalid_reason"]`` (which runs);
    returns ``valid``. Times of such a run are not DFS's times: NaN block scores are never
    selected, so its steps visit fewer blocks and come out fast. A record without runs (an older
    file) stays valid.
    """
    bad = [run for run in record.get("runs", []) if run.get("latents_finite") is False]
    record["valid"] = not bad
    record.pop("invalid_reason", None)
    if bad:
        record["invalid_reason"] = "non-finite latents after " + "; ".join(
            f"the {run['program']} run {run['kinds']}" for run in bad
        )
    return record["valid"]


def exit_status(records: list[dict]) -> int:
    """0 when every record is valid, 3 when one is not (:func:`check_validity`), 1 without records."""
    if not records:
        return 1
    return 0 if all(check_validity(r) for r in records) else 3


def problem_key(record: dict) -> tuple:
    return (record["config"], record["tokens"], record["dtype"], record["density"])


def add_scaling(records: list[dict]) -> None:
    """Per-step scaling of every valid record vs the valid one-device record of the same problem
    (an invalid record, :func:`check_validity`, gets no scaling and is no baseline)."""
    ones = {problem_key(r): r for r in records if r["devices"] == 1 and check_validity(r)}
    for r in records:
        base = ones.get(problem_key(r))
        if not check_validity(r):
            r.pop("scaling_vs_1", None)
            continue
        if base is None:
            continue
        r["scaling_vs_1"] = {k: base["per_step_ms"][k] / t for k, t in r["per_step_ms"].items()
                             if k in base["per_step_ms"] and t > 0}
        if r.get("schedule") and base.get("schedule"):
            r["scaling_vs_1"]["schedule_dfs"] = base["schedule"]["dfs_s"] / r["schedule"]["dfs_s"]


def load_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        records.extend(data if isinstance(data, list) else [data])
    return records


#: The columns of :func:`table`.
COLUMNS = ("devices", "mode", "dense step ms", "scaling", "refresh step ms", "scaling", "sparse step ms", "scaling",
           "50-step DFS s", "scaling", "all-to-all GB/step", "peak GiB per device")  # fmt: skip


def table(records: list[dict]) -> list[str]:
    """A heading (the problem of the first record) and one Markdown row per record, by device
    count and mode; an invalid record (:func:`check_validity`) shows no times."""

    def ms(r, k):
        v = r["per_step_ms"].get(k)
        return "" if v is None else f"{v:,.0f}"

    def scale(r, k):
        v = r.get("scaling_vs_1", {}).get(k)
        return "" if v is None else f"{v:.2f}x"

    rows = []
    for r in sorted(records, key=lambda r: (r["devices"], r["mode"])):
        sched = r.get("schedule") or {}
        peaks = ", ".join(f"{m['peak_gib']:.1f}" for m in r["memory"] if m.get("peak_gib")) or "n/a"
        tail = [f"{r['all_to_all_bytes_per_step'] / 1e9:.1f}", peaks]
        if not check_validity(r):
            rows.append([r["devices"], r["mode"], "INVALID (non-finite latents)", *[""] * 7, *tail])
            continue
        rows.append([r["devices"], r["mode"], ms(r, "dense"), scale(r, "dense"), ms(r, "refresh"), scale(r, "refresh"),
                     ms(r, "sparse"), scale(r, "sparse"), f"{sched.get('dfs_s', float('nan')):.1f}",
                     scale(r, "schedule_dfs"), *tail])  # fmt: skip
    first = records[0]
    return [
        f"### {first['config']} {first['video']}, {first['tokens']} tokens, {first['dtype']}, batch 2 "
        f"(guidance), DFS density {first['density']} on {first['meta']['device']}",
        "",
        *markdown_table(COLUMNS, rows, align=("right", "left", *["right"] * 10)),
    ]


def save(path: str | None, records: list[dict]) -> None:
    if path:
        write_json(path, records)


def run_variant(args, model, cfg, parallel, inputs, nk: int, num_blocks: int, grid, records: list[dict]) -> dict:
    noise, text, negative = inputs
    num_tokens = math.prod(grid)
    label = "1 device" if parallel is None else f"{parallel.size} devices, {parallel}"
    dfs = DFSConfig(tile_size=args.tile_size, block_size=args.block_size, order=args.order)
    record = {
        "config": cfg.name, "video": f"{args.frames}x{args.height}x{args.width}", "token_grid": list(grid),
        "tokens": num_tokens, "dtype": jnp.dtype(model.dtype).name, "density": args.density,
        "kept_blocks": f"{num_blocks}/{nk}", "devices": 1 if parallel is None else parallel.size,
        "mode": "none" if parallel is None else parallel.mode,
        "guidance": 1 if parallel is None else parallel.guidance, "heads": 1 if parallel is None else parallel.heads,
        "per_step_ms": {}, "steps_ms": {}, "compile_s": {},
        "all_to_all_bytes_per_step": all_to_all_bytes_per_step(
            cfg, 2, num_tokens, jnp.dtype(model.dtype).itemsize, parallel),
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median",
                   "source": "SampleResult.step_s (per-step callbacks)"},
        "meta": run_record(__file__, args.argv),
    }
    records.append(record)
    bytes_step = record["all_to_all_bytes_per_step"]
    if bytes_step:
        predicted = bytes_step / (NVLINK_GBPS * 1e9 * ALL_TO_ALL_EFFICIENCY)
        record["all_to_all_predicted_ms"] = predicted * 1e3
        print(f"[{label}] all-to-all {bytes_step / 1e9:.2f} GB per step per device, predicted "
              f"{predicted * 1e3:.0f} ms at {NVLINK_GBPS * ALL_TO_ALL_EFFICIENCY:.0f} GB/s", flush=True)

    def measure(sampler: Sampler, name: str, kinds: list[str], measured: tuple[str, ...]) -> None:
        """One sampler run of the step kinds ``kinds``; records the median of each measured kind."""
        warm = 0 if record["compile_s"] else args.warmup
        kinds = [kinds[0]] * warm + kinds
        plan = step_plan(kinds, nk, num_blocks) if sampler.backend.is_sparse else None
        traces_before, called = sampler.trace_count, time.perf_counter()
        result = sampler(noise, text, negative, num_steps=len(kinds), plan=plan, guidance_scale=5.0)
        call_s = time.perf_counter() - called  # host wall time of the call, compile included
        record["compile_s"].setdefault(name, result.compile_s)  # the first call of a program compiles it
        record["programs"] = record.get("programs", 0) + sampler.trace_count - traces_before
        steps_ms = np.asarray(result.step_s, np.float64) * 1e3
        # Cross-checks of the callback timing: the run's wall time from the loop's start and, for a
        # run of an already compiled program, the host time from the call to the blocked result.
        recompiled = sampler.trace_count != traces_before
        latents = np.asarray(jax.device_get(result.latents), np.float32)
        run = {"program": name, "kinds": kinds, "time_s": result.time_s, "call_s": call_s,
               "sum_of_steps_s": float(np.sum(steps_ms)) / 1e3, "compiled_in_call": bool(recompiled),
               "latents_finite": bool(np.isfinite(latents).all()),
               "latents_abs_max": float(np.nanmax(np.abs(latents))) if np.isfinite(latents).any() else None,
               "skipped": [float(v) for v in np.asarray(result.skipped)]}
        print(f"[{label}] {name} run {kinds}: latents finite {run['latents_finite']}, |max| "
              f"{run['latents_abs_max']}, skipped fraction per step {np.round(run['skipped'], 3).tolist()}", flush=True)
        record.setdefault("runs", []).append(run)
        if not check_validity(record):
            print(f"!!! [{label}] INVALID: non-finite latents after the {name} run {kinds}; the step times of this "
                  "variant are not DFS's (NaN block scores are never selected, so steps visit fewer blocks)",
                  flush=True)
        if not recompiled:
            print(f"[{label}] host wall time of the {len(kinds)}-step run {call_s:.2f} s, sum of its step times "
                  f"{run['sum_of_steps_s']:.2f} s", flush=True)
        for kind in measured:
            times = [float(t) for t, k in list(zip(steps_ms, kinds))[warm:] if k == kind]
            key = "dense-backend" if name == "dense-backend" else kind
            record["steps_ms"][key] = times
            record["per_step_ms"][key] = statistics.median(times)
            print(f"[{label}] {key:13s} step {record['per_step_ms'][key]:10.1f} ms (steps: "
                  f"{', '.join(f'{t:.0f}' for t in times)}; call to first step {result.compile_s:.1f} s)", flush=True)
        add_scaling(records + args.baseline_records)
        for kind in measured:
            key = "dense-backend" if name == "dense-backend" else kind
            if key in record.get("scaling_vs_1", {}) and record["devices"] > 1:
                print(f"[{label}] {key} step scaling vs 1 device: {record['scaling_vs_1'][key]:.3f}x", flush=True)
        record["memory"] = memory_per_device(parallel)
        save(args.out, records)

    record["memory"] = memory_per_device(parallel)
    wanted = [k for k in ("dense", "refresh", "sparse") if k in args.kinds]
    if wanted:
        sampler = Sampler(model, AttentionBackend("dfs", dfs), parallel=parallel, max_density=args.max_density)
        if "dense" in wanted:
            measure(sampler, "dfs", ["dense"] * args.iters, ("dense",))
        sparse_kinds = [k for k in wanted if k != "dense"]
        if sparse_kinds:
            lead = [] if "refresh" in sparse_kinds else ["refresh"]  # sparse steps need a refresh first
            measure(sampler, "dfs", lead + [k for k in sparse_kinds for _ in range(args.iters)], tuple(sparse_kinds))
    if "dense-backend" in args.kinds:
        measure(Sampler(model, "dense", parallel=parallel), "dense-backend", ["dense"] * args.iters, ("dense",))
    schedule = plan_schedule(dfs, args.steps, nk)
    record["schedule"] = compose(record["per_step_ms"], schedule, args.density) if check_validity(record) else None
    if record["schedule"]:
        s = record["schedule"]
        print(f"[{label}] composed {s['steps']}-step schedule: dense {s['dense_s']:.1f} s, DFS {s['dfs_s']:.1f} s "
              f"({s['speedup']:.2f}x)", flush=True)
    add_scaling(records + args.baseline_records)
    save(args.out, records)
    return record


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.argv = argv
    if args.table:
        records = load_records(args.table)
        add_scaling(records)
        print("\n".join(table(records)) + "\n")
        report_invalid(records)
        return records
    args.baseline_records = load_records([args.baseline]) if args.baseline else []  # read once
    cfg = get_config(args.config)
    dtype = jnp.dtype(args.dtype) if args.dtype else default_dtype()
    parallels = variants(args.devices, args.mode)
    sizes = problem_sizes(cfg, args.frames, args.height, args.width, args.block_size, args.density)
    for parallel in parallels:  # fail before building the model
        if parallel is not None:
            parallel.check(batch=2, num_heads=cfg.num_heads, num_tokens=sizes["tokens"], guided=True)
            _ = parallel.mesh
    shape, grid, num_tokens, nk, num_blocks = (sizes[k] for k in ("shape", "grid", "tokens", "nk", "num_blocks"))
    print(f"{cfg.name} {args.frames}x{args.height}x{args.width}: {num_tokens} tokens, {nk} key blocks, keep "
          f"{num_blocks} at density {args.density}; {dtype.name}; {len(jax.devices())} x {jax.devices()[0].device_kind}; "
          f"variants: {', '.join('1' if p is None else str(p) for p in parallels)}", flush=True)
    start = time.perf_counter()
    model = random_model(cfg, dtype, args.seed)
    print(f"random weights in {time.perf_counter() - start:.1f} s", flush=True)
    inputs = random_inputs(cfg, shape, dtype, args.seed)
    records: list[dict] = []
    for parallel in parallels:
        run_variant(args, model, cfg, parallel, inputs, nk, num_blocks, grid, records)
    add_scaling(records + args.baseline_records)
    save(args.out, records)
    print("\n".join(table(records)) + "\n")
    report_invalid(records)
    return records


def report_invalid(records: list[dict]) -> None:
    """One loud line per invalid record (after the table, so it is the last thing printed)."""
    for r in records:
        if not check_validity(r):
            print(f"!!! INVALID: {r['devices']} device(s), {r['mode']}: {r['invalid_reason']}", flush=True)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
