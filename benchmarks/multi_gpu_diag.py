"""Where sharded DFS goes wrong on the GPUs: one model, every parallelism, kernel swaps.

The tool that found why sharded DFS runs went non-finite on two H200s (benchmarks/NOTES.md,
"Several GPUs"), kept for the next such hunt. It narrows a fault down on the Wan2.1-14B
architecture cut to ``--layers`` blocks (random bf16 weights, batch 2 = classifier-free
guidance), for each parallelism (``none``: one device, the reference; ``guidance``: 2x1;
``heads``: 1x2) and each variant of the attention backend:

``default``
  the kernels this device picks (Mosaic GPU attention in bf16 on Hopper, the Triton scorer);
``sparse=NAME``, ``scoring=NAME``, ``dense=NAME``
  :attr:`~models.common.processor.AttentionBackend.sparse_implementation` (``mosaic_gpu``,
  ``triton``, ``xla``), ``scoring_implementation`` (``triton``, ``jnp``) or
  ``dense_implementation`` (``cudnn``, ``xla``: the always-dense layers and dense steps), joined
  with ``+`` (``sparse=triton+scoring=jnp``);
``env=NAME``
  the same program launched differently (:data:`ENV_SETS`): ``no-command-buffer`` (no CUDA
  graphs), ``sync-collectives``, ``no-latency-hiding`` (XLA flags of the GPU runtime and
  scheduler) or ``launch-blocking`` (``CUDA_LAUNCH_BLOCKING=1``); combinable with the others.

The ``xla`` attentions hold ``L x L`` logits per (sample, head): above
:data:`MAX_QUADRATIC_ELEMENTS` (at 75,600 tokens) they are skipped with the reason; use them at a
smaller video (``--frames 9 --height 256 --width 256``).

Stages (``--stages``), per (variant, parallelism), in one compiled program each:

``forward``
  ONE jitted model forward (outside any loop) with a dense step control, then a refresh control
  (``sparse_step(num_blocks)``: score, select, store, attend), then a sparse control with the
  refreshed cache on the same input, which must reproduce the refresh's output (``rel L2 vs
  refresh``: a cache corrupted between the calls shows here);
``sampler``
  a :class:`~models.sampling.loop.Sampler` run of [refresh, sparse, sparse] (the while loop, the
  ``lax.cond`` branches and the cache carried across steps).

Per run: the finite fraction of the output (forward) or latents (sampler), the mean kept count
per mask-cache slot and the first layer whose count falls short of ``num_blocks`` (NaN q/k make
NaN block scores, which :func:`~dfsattn_jax.layout.select_blocks` never selects: that layer is
the first whose q/k went non-finite), the skipped fraction (per step for the sampler), and the
relative L2 distance and mask-row agreement vs the one-device run of the same variant and stage
(bf16 rounding alone gives ~1e-2 there; NaN, or a large distance with few agreeing rows, is the
finding), and the wall time of the call (a program's first call includes its compile).
``--max-density 0.2`` sizes the mask cache to the kept blocks (no padded index columns), to tell
a kernel reading past a row's count from the rest.

Each variant runs in its own worker process (this module with ``--worker``), under a hard time
limit (``--stage-timeout``, and the whole run within ``--budget-s``), so a crash or a hang of one
variant costs only that variant; a worker's log is ``OUT.<variant>.log`` and its records
``OUT.<variant>.json``; the records of all of them go to ``--out`` and a table is printed last.
The default variants run in the order of :data:`DEFAULT_VARIANTS` while ``--budget-s`` lasts.
Exit status: 3 when a run is not finite, 4 when a worker failed or timed out (none non-finite),
else 0.

GPU (2 devices; ~5-7 min; ``bash benchmarks/multi_gpu_session.sh diag`` runs this with NVLink
multicast off and keeps the log under ``$OUT``)::

    NCCL_NVLS_ENABLE=0 python -m benchmarks.multi_gpu_diag --out $OUT/multi_diag.json

narrowing down, e.g.::

    python -m benchmarks.multi_gpu_diag --variants sparse=triton+scoring=jnp --modes heads --stages sampler \\
        --out $OUT/diag_heads.json

CPU smoke test (tiny config, 2 host devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python -m benchmarks.multi_gpu_diag \\
        --config tiny --layers 2 --frames 9 --height 128 --width 128 --block-size 16 --tile-size 4 \\
        --variants default,scoring=jnp,sparse=xla --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import first_call, module_command, run_record
from benchmarks.multi_gpu_bench import problem_sizes, random_inputs, random_model, step_plan
from benchmarks.multi_gpu_check import same_rows
from dfsattn_jax.dispatch import ATTENTION, SCORING
from dfsattn_jax.metrics import attention_error
from dfsattn_jax.schedule import DFSConfig
from models.common.parallel import Parallelism, make_parallel, replicate, shard_batch, shard_cache
from models.common.processor import AttentionBackend, AttentionState, dense_step, init_cache, skipped_fraction
from models.common.processor import sparse_step
from models.evaluation.results import write_json
from models.evaluation.tables import markdown_table
from models.sampling.loop import Sampler
from models.wan.config import default_dtype, get_config

#: Variant keys: the backend field each sets and the names it takes.
VARIANT_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sparse": ("sparse_implementation", tuple(ATTENTION)),
    "scoring": ("scoring_implementation", tuple(SCORING)),
    "dense": ("dense_implementation", ("cudnn", "xla")),
}
#: Environments a variant may give its worker (``env=NAME``): switches of the XLA GPU runtime that
#: change how the program is launched and ordered, not what it computes (XLA_FLAGS are appended).
ENV_SETS: dict[str, dict[str, str]] = {
    "no-command-buffer": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="},  # no CUDA graphs
    "sync-collectives": {"XLA_FLAGS": "--xla_gpu_disable_async_collectives=ALLCOLLECTIVES"},
    "no-latency-hiding": {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"},
    "launch-blocking": {"CUDA_LAUNCH_BLOCKING": "1"},  # every kernel launch waits for the kernel
}
#: The default variants, most informative first (the last ones run while --budget-s lasts).
DEFAULT_VARIANTS = "default,scoring=jnp,sparse=triton,env=no-command-buffer"
MODES: tuple[str, ...] = ("none", "guidance", "heads")
STAGES: tuple[str, ...] = ("forward", "sampler")
SAMPLER_KINDS = ["refresh", "sparse", "sparse"]
#: Largest ``batch x heads x L x L`` per device an XLA attention may hold (2^31: 8 GiB of float32 logits).
MAX_QUADRATIC_ELEMENTS = 2**31


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="wan2.1-14b")
    p.add_argument("--layers", type=int, default=4, help="keep only the first LAYERS transformer blocks")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--devices", type=int, default=2, help="devices of the guidance and heads meshes")
    p.add_argument("--modes", default="guidance,heads", help=f"parallel modes besides 'none' (always run first), of {MODES[1:]}")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated: default, or KEY=NAME joined with +")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {STAGES}")
    p.add_argument("--density", type=float, default=0.2, help="density of the refresh (118 of 591 blocks at 720p)")
    p.add_argument("--max-density", type=float, default=0.5, help="mask-cache capacity, as the sampler's default")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=16)
    p.add_argument("--order", default="hilbert3d")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: bf16 on GPU, f32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-timeout", type=float, default=180.0, help="seconds one variant's worker may run")
    p.add_argument("--budget-s", type=float, default=400.0, help="seconds for all workers together")
    p.add_argument("--out", default=None, help="JSON of all records (workers' files and logs beside it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.variant_list = [v for v in args.variants.split(",") if v]
        for spec in args.variant_list:
            parse_variant(spec)
        args.mode_list = ["none"] + [m for m in args.modes.split(",") if m and m != "none"]
        bad = [m for m in args.mode_list if m not in MODES]
        if bad:
            raise ValueError(f"--modes: unknown {bad}; choose from {MODES[1:]}")
        args.stage_list = [s for s in args.stages.split(",") if s]
        bad = [s for s in args.stage_list if s not in STAGES]
        if bad or not args.stage_list:
            raise ValueError(f"--stages: unknown {bad or 'none given'}; choose from {STAGES}")
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
    except ValueError as err:
        p.error(str(err))
    return args


class Variant(NamedTuple):
    """A variant: the backend fields it sets and the environment its worker gets."""

    fields: dict[str, str]
    env: dict[str, str]


def parse_variant(spec: str) -> Variant:
    """A variant from its spec: ``"default"`` -> no field, no environment;
    ``"sparse=xla+scoring=jnp+env=no-command-buffer"`` -> ``sparse_implementation="xla"``,
    ``scoring_implementation="jnp"`` and ``XLA_FLAGS`` with ``--xla_gpu_enable_command_buffer=``
    (several ``env=`` parts add up).

    Raises:
      ValueError: naming the unknown key or name and the choices.
    """
    fields: dict[str, str] = {}
    env: dict[str, str] = {}
    if spec == "default":
        return Variant(fields, env)
    for part in spec.split("+"):
        key, _, name = part.partition("=")
        if key == "env":
            if name not in ENV_SETS:
                raise ValueError(f"variant {spec!r}: env must be one of {tuple(ENV_SETS)}, got {name!r}")
            for var, value in ENV_SETS[name].items():
                env[var] = f"{env[var]} {value}" if var in env else value
            continue
        if key not in VARIANT_KEYS:
            keys = (*VARIANT_KEYS, "env")
            raise ValueError(f"variant {spec!r}: key must be one of {keys} (KEY=NAME), got {key!r}")
        field, names = VARIANT_KEYS[key]
        if name not in names:
            raise ValueError(f"variant {spec!r}: {key} must be one of {names}, got {name!r}")
        fields[field] = name
    return Variant(fields, env)


def worker_env(variant: Variant, base: dict[str, str]) -> dict[str, str]:
    """``base`` (the driver's environment) with the variant's additions (``XLA_FLAGS`` appended)."""
    env = dict(base)
    for var, value in variant.env.items():
        env[var] = f"{env[var]} {value}".strip() if var == "XLA_FLAGS" and env.get(var) else value
    return env


def variant_slug(spec: str) -> str:
    """A file-name-safe form of a variant (``sparse=xla+scoring=jnp`` -> ``sparse-xla_scoring-jnp``)."""
    return spec.replace("=", "-").replace("+", "_")


def parallel_for(mode: str, devices: int) -> Parallelism | None:
    return None if mode == "none" else make_parallel(devices, mode)


def quadratic_elements(fields: dict[str, str], batch: int, heads: int, tokens: int) -> int:
    """``batch x heads x L x L``: the logits an XLA attention of the variant holds on one device
    (the one-device reference run; 0 for a variant without an XLA attention)."""
    return batch * heads * tokens * tokens if "xla" in fields.values() else 0


# --------------------------------------------------------------------------- the worker


def forward_program(model, backend: AttentionBackend):
    """The jitted ``(state, x, t, text, control, cache) -> (out float32, cache)`` forward of
    ``model`` with ``backend`` (under ``backend.parallel``: batch and cache sharded as the sampler
    shards them, the output replicated)."""
    graphdef, _ = nnx.split(model)
    parallel = backend.parallel

    @jax.jit
    def forward(state, x, t, text, control, cache):
        x, t, text = shard_batch((x, t, text), parallel)
        attention = AttentionState(control=control, cache=shard_cache(cache, parallel))
        out, attention = nnx.merge(graphdef, state).forward(x, t, text, backend=backend, state=attention)
        return replicate(out.astype(jnp.float32), parallel), shard_cache(attention.cache, parallel)

    return forward


def cache_stats(cache, num_blocks: int, layers: tuple[int, ...]) -> dict:
    """Mean kept count per cache slot, and the first layer whose rows keep fewer than ``num_blocks``."""
    counts = np.asarray(cache.kv_counts, np.float64)  # [S, B, N, nq]
    kept = counts.mean(axis=(1, 2, 3))
    short = np.flatnonzero(kept < num_blocks)
    return {"kept_mean_per_slot": [float(c) for c in kept], "slot_layers": list(layers),
            "short_rows_per_slot": [float(f) for f in (counts < num_blocks).mean(axis=(1, 2, 3))],
            "first_short_layer": int(layers[short[0]]) if short.size else None}


def output_stats(x) -> dict:
    x = np.asarray(x, np.float32)
    finite = np.isfinite(x)
    return {"finite_fraction": float(finite.mean()),
            "abs_max": float(np.abs(x[finite]).max()) if finite.any() else None}


def rel_l2(a, b) -> float | None:
    value = float(attention_error(np.asarray(a, np.float32), np.asarray(b, np.float32)))
    return value if math.isfinite(value) else None


class Worker:
    """One variant over every parallelism (one model; one forward program and one sampler each)."""

    def __init__(self, args, spec: str):
        self.args, self.spec = args, spec
        self.cfg = get_config(args.config)
        if args.layers > self.cfg.num_layers:
            raise ValueError(f"--layers must be <= {self.cfg.num_layers} for {self.cfg.name}, got {args.layers}")
        self.cfg = self.cfg.replace(num_layers=args.layers)
        self.dtype = jnp.dtype(args.dtype) if args.dtype else default_dtype()
        self.sizes = problem_sizes(self.cfg, args.frames, args.height, args.width, args.block_size, args.density)
        dfs = DFSConfig(tile_size=args.tile_size, block_size=args.block_size, order=args.order)
        self.backend = AttentionBackend("dfs", dfs, **parse_variant(spec).fields)
        self.layers = self.backend.sparse_layers(self.cfg.num_layers)
        start = time.perf_counter()
        self.model = random_model(self.cfg, self.dtype, args.seed)
        self.noise, self.text, self.negative = random_inputs(self.cfg, self.sizes["shape"], self.dtype, args.seed)
        self.say(f"{self.cfg.name} cut to {args.layers} layers, {self.sizes['tokens']} tokens, keep "
                 f"{self.sizes['num_blocks']} of {self.sizes['nk']} key blocks, {self.dtype.name}, "
                 f"{jax.device_count()} x {jax.devices()[0].device_kind}; weights in {time.perf_counter() - start:.1f} s; "
                 f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
        self.records: list[dict] = []
        self.reference: dict[str, tuple] = {}  # stage -> (output, cache) of the one-device run

    def say(self, text: str) -> None:
        print(f"[{self.spec}] {text}", flush=True)

    def record(self, parallel: Parallelism | None, stage: str, output, cache, seconds: float, **extra) -> dict:
        rec = {"variant": self.spec, "parallel": "none" if parallel is None else str(parallel),
               "mode": "none" if parallel is None else parallel.mode, "stage": stage,
               "time_s": seconds, **output_stats(output), **extra}
        if cache is not None:
            rec.update(cache_stats(cache, self.sizes["num_blocks"], self.layers))
        if parallel is None:
            self.reference[stage] = (np.asarray(output, np.float32), cache)
        elif stage in self.reference:
            ref_out, ref_cache = self.reference[stage]
            rec["rel_l2_vs_1"] = rel_l2(output, ref_out)
            if cache is not None and ref_cache is not None:
                rec["mask_rows_agree_vs_1"] = same_rows(cache, ref_cache)
        self.records.append(rec)
        self.say(f"{rec['parallel']:12s} {stage:16s} finite {rec['finite_fraction']:.4f}  kept/slot "
                 f"{[round(c, 1) for c in rec.get('kept_mean_per_slot', [])]}  first short layer "
                 f"{rec.get('first_short_layer')}  skipped {rec.get('skipped')}  rel L2 vs 1 {rec.get('rel_l2_vs_1')}  "
                 f"mask rows agree {rec.get('mask_rows_agree_vs_1')}  {seconds:.1f} s")
        self.save()
        return rec

    def save(self) -> None:
        write_json(self.args.part, {"meta": run_record(__file__, self.args.argv), "variant": self.spec,
                                    "records": self.records})  # fmt: skip

    def run(self, mode: str) -> None:
        parallel = parallel_for(mode, self.args.devices)
        if parallel is not None:
            parallel.check(batch=2, num_heads=self.cfg.num_heads, num_tokens=self.sizes["tokens"], guided=True)
        nk, num_blocks = self.sizes["nk"], self.sizes["num_blocks"]
        sampler = Sampler(self.model, self.backend, parallel=parallel, progress=False, max_density=self.args.max_density)
        plan = step_plan(SAMPLER_KINDS, nk, num_blocks)
        if "forward" in self.args.stage_list:
            self.forward(sampler, sampler.cache_capacity(plan))
        if "sampler" in self.args.stage_list:
            start = time.perf_counter()
            result = sampler(self.noise, self.text, self.negative, num_steps=len(SAMPLER_KINDS), plan=plan,
                             guidance_scale=5.0)
            self.record(parallel, "sampler", result.latents, result.cache, time.perf_counter() - start,
                        skipped=[round(float(s), 4) for s in result.skipped], kinds=SAMPLER_KINDS,
                        programs=sampler.trace_count)

    def forward(self, sampler: Sampler, max_blocks: int) -> None:
        backend, parallel = sampler.backend, sampler.parallel
        x = jnp.tile(self.noise, (2, 1, 1, 1, 1)).astype(self.dtype)
        t = jnp.full((2,), 999.0, jnp.float32)
        text = jnp.concatenate([self.text, self.negative], axis=0)
        cache = init_cache(backend, self.cfg.num_layers, 2, self.cfg.num_heads, self.sizes["tokens"], max_blocks)
        state = nnx.state(self.model)
        if parallel is not None:  # replicated onto the mesh, as the sampler puts its inputs
            state, x, t, text, cache = jax.device_put((state, x, t, text, cache), parallel.sharding())
            # The cache sharded as the program returns it, so the sparse call reuses the program.
            cache = jax.jit(lambda c: shard_cache(c, parallel))(cache)
        forward = forward_program(self.model, backend)
        outputs = {}
        controls = [("forward-dense", dense_step()), ("forward-refresh", sparse_step(self.sizes["num_blocks"])),
                    ("forward-sparse", sparse_step(self.sizes["num_blocks"], refresh=False))]
        for stage, control in controls:
            (out, new_cache), seconds = first_call(forward, state, x, t, text, control, cache)
            outputs[stage] = np.asarray(out)
            extra = {}
            if stage != "forward-dense":
                extra["skipped"] = round(float(skipped_fraction(new_cache, self.cfg.num_layers)), 4)
            if stage == "forward-sparse":
                extra["rel_l2_vs_refresh"] = rel_l2(out, outputs["forward-refresh"])
            self.record(parallel, stage, out, None if stage == "forward-dense" else new_cache, seconds, **extra)
            if stage == "forward-refresh":
                cache = new_cache  # the sparse step reuses the refreshed layouts


def worker_main(args) -> int:
    worker = Worker(args, args.worker)
    worker.save()
    for mode in args.mode_list:
        worker.run(mode)
    return 0


# --------------------------------------------------------------------------- the driver


def part_path(out: str, spec: str, suffix: str) -> pathlib.Path:
    base = pathlib.Path(out)
    return base.with_name(f"{base.stem}.{variant_slug(spec)}{suffix}")


def launch(args, argv: list[str], spec: str, timeout: float) -> dict:
    """Runs the worker of ``spec`` under ``timeout``; returns its records (or what failed)."""
    part, log = part_path(args.out, spec, ".json"), part_path(args.out, spec, ".log")
    part.unlink(missing_ok=True)
    cmd = module_command(__file__, [*argv, "--worker", spec])
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            env = worker_env(parse_variant(spec), dict(os.environ))
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            error = None if done.returncode == 0 else f"worker exited with status {done.returncode}"
        except subprocess.TimeoutExpired:
            error = f"worker killed after {timeout:g} s (--stage-timeout / --budget-s)"
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(line for line in lines if line.startswith(f"[{spec}]")), flush=True)
    if error:
        print(f"!!! [{spec}] {error}; the end of {log}:\n" + "\n".join(lines[-25:]), flush=True)
    result = {"variant": spec, "seconds": time.perf_counter() - start, "error": error, "log": str(log), "records": []}
    if part.exists():
        result["records"] = json.loads(part.read_text())["records"]
    return result


#: The columns of :func:`table`, and their alignments.
COLUMNS = ("variant", "parallel", "stage", "finite", "kept per slot", "first short layer", "skipped", "rel L2 vs 1",
           "mask rows agree", "sparse vs refresh", "s")  # fmt: skip
ALIGN = ("left", "left", "left", "right", "left", "right", "left", "right", "right", "right", "right")


def table(variants: list[dict]) -> list[str]:
    """One Markdown row per record (and one per skipped or failed variant); a distance measured
    but not finite reads NaN, one not measured is empty."""

    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    def dist(r, key):
        return "" if key not in r else "NaN" if r[key] is None else format(r[key], ".2e")

    rows = []
    for var in variants:
        if var.get("skipped_reason") or var.get("error"):
            rows.append([var["variant"], "", "", var.get("skipped_reason") or var["error"], *[""] * 7])
        for r in var["records"]:
            kept = ", ".join(f"{c:.1f}" for c in r.get("kept_mean_per_slot", []))
            rows.append([r["variant"], r["parallel"], r["stage"], f"{r['finite_fraction']:.4f}", kept,
                         num(r.get("first_short_layer"), "d"), r.get("skipped", ""), dist(r, "rel_l2_vs_1"),
                         num(r.get("mask_rows_agree_vs_1"), ".4f"), dist(r, "rel_l2_vs_refresh"), f"{r['time_s']:.1f}"])
    return markdown_table(COLUMNS, rows, align=ALIGN)


def driver_main(args, argv: list[str]) -> int:
    if args.out is None:
        args.out = str(pathlib.Path(tempfile.mkdtemp(prefix="multi_gpu_diag_")) / "multi_diag.json")
        argv = [*argv, "--out", args.out]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cfg = get_config(args.config)
    sizes = problem_sizes(cfg, args.frames, args.height, args.width, args.block_size, args.density)
    for mode in args.mode_list:  # fail before starting a worker
        parallel = parallel_for(mode, args.devices)
        if parallel is not None:
            parallel.check(batch=2, num_heads=cfg.num_heads, num_tokens=sizes["tokens"], guided=True)
            _ = parallel.mesh
    print(f"{cfg.name} cut to {args.layers} layers at {args.frames}x{args.height}x{args.width}: {sizes['tokens']} "
          f"tokens, keep {sizes['num_blocks']} of {sizes['nk']} key blocks; variants {args.variant_list}, parallel "
          f"{args.mode_list}, stages {args.stage_list}", flush=True)
    deadline = time.perf_counter() + args.budget_s
    results = []
    for spec in args.variant_list:
        quad = quadratic_elements(parse_variant(spec).fields, 2, cfg.num_heads, sizes["tokens"])
        left = deadline - time.perf_counter()
        if quad > MAX_QUADRATIC_ELEMENTS:
            skip = f"skipped: an XLA attention would hold {quad:.2e} > {MAX_QUADRATIC_ELEMENTS:.2e} logits per device"
        elif left < 20:
            skip = f"skipped: --budget-s {args.budget_s:.0f} spent"
        else:
            skip = None
        if skip:
            print(f"[{spec}] {skip}", flush=True)
            results.append({"variant": spec, "skipped_reason": skip, "records": []})
        else:
            results.append(launch(args, argv, spec, min(args.stage_timeout, left)))
        write_json(args.out, {"meta": run_record(__file__, argv), "argv": argv, "variants": results})
    print()
    print("\n".join(table(results)))
    return status(results)


def status(variants: list[dict]) -> int:
    """3 when a run is not finite (one ``!!!`` line each), 4 when a worker failed or timed out
    (none non-finite), else 0. ``variants``: the driver's per-variant results."""
    nonfinite = [r for var in variants for r in var["records"] if r["finite_fraction"] < 1.0]
    for r in nonfinite:
        print(f"!!! NON-FINITE: {r['variant']} {r['parallel']} {r['stage']} (finite {r['finite_fraction']:.4f}, first "
              f"short layer {r.get('first_short_layer')})", flush=True)
    for var in variants:
        if var.get("error"):
            print(f"!!! FAILED: {var['variant']}: {var['error']} (log {var['log']})", flush=True)
    if nonfinite:
        return 3
    return 4 if any(var.get("error") for var in variants) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if args.worker is not None:
        args.part = str(part_path(args.out, args.worker, ".json"))
        return worker_main(args)
    return driver_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
