"""End-to-end benchmark: Wan2.1 denoising steps, dense (cuDNN) vs DFSAttn (Pallas), random weights.

Default: Wan2.1-1.3B at 480x832, 81 frames (21x30x52 = 32,760 tokens), bf16, batch 2
(classifier-free guidance as one batch). Measures, after warm-up, the median time of

- a dense step (the ``dense`` backend: cuDNN attention, raster order, no cache);
- a dense step of the ``dfs`` backend (token permutation + cache pass-through, dense attention);
- per density (default 0.3, 0.2, 0.1 plus the plan's): a sparse step reusing cached layouts,
  and a refresh step (scoring + selection + sparse attention);
- the overhead pieces in isolation: token permutation + RoPE tables (per step), mask-cache
  reads/writes of all sparse layers (per step), scoring + selection of one layer (per layer
  per refresh step);

then composes the default 50-step schedule (12 dense + 38 sparse steps, 3 of them refreshes)
from those per-step times, and with ``--measure-full`` also times the whole jitted sampler
(one program for all steps) dense and DFS. Peak GPU memory comes from
``device.memory_stats()``. Writes ``benchmarks/results/e2e_<device_slug>[_<size>].json`` (e.g.
``e2e_nvidia_h200.json``; :func:`models.evaluation.results.device_slug`) and a markdown table next to it.

Needs the package installed (``pip install -e .``); run from the repository root.

GPU (what the lead runs)::

    python -m benchmarks.e2e_bench --measure-full
    python -m benchmarks.e2e_bench --measure-full --schedule fast   # a named preset: e2e_<slug>_fast.json

Reduced size on CPU (a smoke test of the script)::

    JAX_PLATFORMS=cpu python -m benchmarks.e2e_bench --config tiny --frames 9 \
        --height 64 --width 64 --block-size 16 --tile-size 4 --iters 2 --measure-full
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import RESULTS_DIR, first_call, median_time, peak_memory_bytes, run_record, write_markdown
from dfsattn_jax.attention import block_sparse_attention, dense_attention
from dfsattn_jax.dispatch import resolve
from dfsattn_jax.cache import cache_layout, cache_update
from dfsattn_jax.layout import blocks_for_density, select_blocks
from dfsattn_jax.schedule import SCHEDULE_PRESETS, DFSConfig, get_schedule_preset, plan_schedule, reported_sparsity
from dfsattn_jax.scoring import block_scores
from models.common.processor import (
    AttentionBackend,
    dense_step,
    init_cache,
    num_token_blocks,
    sparse_step,
    token_permutation,
)
from models.common.rope import rope_tables
from models.evaluation.results import device_name, device_slug, write_json
from models.evaluation.speed import compose_schedule
from models.evaluation.tables import markdown_table
from models.sampling.loop import Sampler
from models.wan.config import default_dtype, get_config, latent_shape, token_grid
from models.wan.transformer import WanTransformer3DModel, patchify


def measured_blocks(densities, plan, nk: int) -> dict[float, int]:
    """Kept blocks per distinct density (rounded to 6 digits) of ``densities`` and of ``plan``'s
    sparse steps: one measurement per kept-block count the kernel sees, labelled by density."""
    blocks: dict[float, int] = {}
    for d in [*densities, *(float(v) for v in plan.density[plan.sparse])]:
        blocks.setdefault(round(d, 6), blocks_for_density(d, nk))
    return blocks


def cache_round_trip(nk: int):
    """A jitted read and write back of every slot of a mask cache (a step's cache traffic)."""

    @jax.jit
    def cache_only(cache):
        for slot in range(cache.kv_indices.shape[0]):
            cache = cache_update(cache, slot, cache_layout(cache, slot, nk))
        return cache

    return cache_only


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="wan2.1-1.3b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.2, 0.1])
    p.add_argument("--steps", type=int, default=50, help="schedule length composed (and measured)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=16)
    p.add_argument("--order", default="hilbert3d")
    p.add_argument("--schedule", default=None, choices=sorted(SCHEDULE_PRESETS),
                   help="a named schedule preset instead of the default (results get a _<name> suffix)")
    p.add_argument("--max-density", type=float, default=0.5, help="mask-cache capacity, as the sampler's")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls before each timing (>= 1: the isolated pieces compile in their first call)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--measure-full", action="store_true", help="also time the full jitted sampler runs")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: bf16 on GPU, f32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.warmup < 1 or args.iters < 1:
        p.error(f"--warmup and --iters must be >= 1, got {args.warmup} and {args.iters}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = get_config(args.config)
    dtype = jnp.dtype(args.dtype) if args.dtype else default_dtype()
    dfs = DFSConfig(tile_size=args.tile_size, block_size=args.block_size, order=args.order)
    if args.schedule is not None:
        dfs = dataclasses.replace(get_schedule_preset(args.schedule), tile_size=args.tile_size,
                                  block_size=args.block_size, order=args.order)  # fmt: skip
    shape = latent_shape(cfg, args.frames, args.height, args.width)
    grid = token_grid(cfg, shape[1:])
    num_tokens = math.prod(grid)
    nk = num_token_blocks(num_tokens, dfs.block_size)
    plan = plan_schedule(dfs, args.steps, nk)
    blocks = measured_blocks(args.densities, plan, nk)
    densities = sorted(blocks, reverse=True)
    max_blocks = max([*blocks.values(), blocks_for_density(args.max_density, nk)])
    backend = AttentionBackend("dfs", dfs)
    num_sparse = len(backend.sparse_layers(cfg.num_layers))
    print(f"{cfg.name} {args.frames}x{args.height}x{args.width}: grid {grid} = {num_tokens} tokens, "
          f"{nk} blocks, dtype {dtype.name}, device {device_name()}", flush=True)

    model = WanTransformer3DModel(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(args.seed)
    batch = 2  # classifier-free guidance as one batch
    x = jnp.asarray(rng.standard_normal((batch, *shape), np.float32), dtype)
    t = jnp.asarray([500.0, 500.0], jnp.float32)
    text = jnp.asarray(rng.standard_normal((batch, cfg.text_len, cfg.text_dim), np.float32), dtype)

    @jax.jit
    def dense_fwd(state, x, t, text):
        return nnx.merge(graphdef, state)(x, t, text, backend="dense")[0]

    @jax.jit
    def dfs_fwd(state, x, t, text, control, cache):
        return nnx.merge(graphdef, state)(x, t, text, backend=backend, control=control, cache=cache)

    def seconds(fn, *fn_args) -> float:
        return median_time(fn, *fn_args, warmup=args.warmup, repeats=args.iters).median_s

    results: dict = {"per_step_s": {}, "compile_s": {}}
    _, results["compile_s"]["dense"] = first_call(dense_fwd, state, x, t, text)
    t_dense = seconds(dense_fwd, state, x, t, text)
    print(f"dense step (cuDNN/XLA)      {t_dense * 1e3:10.2f} ms", flush=True)
    peak_dense = peak_memory_bytes()

    cache0 = init_cache(backend, cfg.num_layers, batch, cfg.num_heads, num_tokens, max_blocks)
    _, results["compile_s"]["dfs"] = first_call(dfs_fwd, state, x, t, text, dense_step(), cache0)
    t_dfs_dense = seconds(dfs_fwd, state, x, t, text, dense_step(), cache0)
    print(f"dfs backend, dense step     {t_dfs_dense * 1e3:10.2f} ms", flush=True)
    t_sparse, t_refresh = {}, {}
    for d in densities:
        refresh = sparse_step(blocks[d], refresh=True)
        _, cache_d = jax.block_until_ready(dfs_fwd(state, x, t, text, refresh, cache0))
        t_refresh[d] = seconds(dfs_fwd, state, x, t, text, refresh, cache0)
        t_sparse[d] = seconds(dfs_fwd, state, x, t, text, sparse_step(blocks[d], refresh=False), cache_d)
        print(f"density {d:.2f} ({blocks[d]:4d}/{nk} blocks): sparse {t_sparse[d] * 1e3:10.2f} ms "
              f"({t_dense / t_sparse[d]:.2f}x)   refresh {t_refresh[d] * 1e3:10.2f} ms", flush=True)

    # Overhead pieces in isolation.
    order = token_permutation(dfs.order, grid)
    patches = patchify(x, cfg.patch_size)

    @jax.jit
    def permute_only(p):
        cos, sin = rope_tables(cfg.head_dim, grid, order.perm, theta=cfg.rope_theta,
                               max_seq_len=cfg.rope_max_seq_len)
        return order.restore(order.apply(p)), cos, sin

    cache_only = cache_round_trip(nk)
    q = jnp.asarray(rng.standard_normal((batch, num_tokens, cfg.num_heads, cfg.head_dim), np.float32), dtype)
    k = jnp.asarray(rng.standard_normal((batch, num_tokens, cfg.num_heads, cfg.head_dim), np.float32), dtype)

    @jax.jit
    def score_only(q, k, num_blocks):
        scores = block_scores(q, k, tile_size=dfs.tile_size, block_size=dfs.block_size)
        return select_blocks(scores, num_blocks, max_blocks=max_blocks)

    impl, why = resolve("attention", q, block_size=dfs.block_size)
    print(f"sparse attention implementation: {impl} ({why})", flush=True)

    @jax.jit
    def attention_only(q, k, num_blocks):
        layout = select_blocks(block_scores(q, k, tile_size=dfs.tile_size, block_size=dfs.block_size),
                               num_blocks, max_blocks=max_blocks)
        return layout, block_sparse_attention(q, k, k, layout, block_size=dfs.block_size)

    @jax.jit
    def kernel_only(q, k, layout):
        return block_sparse_attention(q, k, k, layout, block_size=dfs.block_size)

    t_attn = {"dense_cudnn": seconds(jax.jit(dense_attention), q, k, k)}
    for d in densities:
        layout_d, _ = attention_only(q, k, jnp.asarray(blocks[d], jnp.int32))
        t_attn[f"{d:g}"] = seconds(kernel_only, q, k, layout_d)
        print(f"one layer's attention at {d:.2f}: {t_attn[f'{d:g}'] * 1e3:.2f} ms "
              f"(dense cuDNN {t_attn['dense_cudnn'] * 1e3:.2f} ms)", flush=True)

    t_perm = seconds(permute_only, patches)
    t_cache = seconds(cache_only, cache0)
    t_score = seconds(score_only, q, k, jnp.asarray(blocks[densities[0]], jnp.int32))
    per_step_overhead = t_perm + t_cache

    # The schedule composed from the per-step times.
    step_times = compose_schedule(plan, t_dfs_dense, t_sparse, t_refresh)
    dense_total = args.steps * t_dense
    dfs_total = float(sum(step_times))
    sparse_idx = np.flatnonzero(plan.sparse)
    sparse_time = float(sum(step_times[s] for s in sparse_idx))
    overhead_total = len(sparse_idx) * per_step_overhead + len(plan.refresh_steps) * num_sparse * t_score
    results.update({
        "meta": run_record(__file__, argv),
        "config": cfg.name,
        "card": device_name(),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "dtype": dtype.name,
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "token_grid": list(grid),
        "tokens": num_tokens,
        "batch": batch,
        "num_key_blocks": nk,
        "kept_blocks": {f"{d:g}": blocks[d] for d in densities},
        "cache_max_blocks": max_blocks,
        "dfs_config": dataclasses.asdict(dfs),
        "schedule_preset": args.schedule,
        "sparse_implementation": {"name": impl, "reason": why},
        "attention_one_layer_s": t_attn,
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median"},
    })
    results["per_step_s"] = {
        "dense": t_dense,
        "dfs_dense_step": t_dfs_dense,
        "sparse": {f"{d:g}": t_sparse[d] for d in densities},
        "refresh": {f"{d:g}": t_refresh[d] for d in densities},
    }
    results["speedup_per_sparse_step"] = {f"{d:g}": t_dense / t_sparse[d] for d in densities}
    results["overhead"] = {
        "permutation_and_rope_s": t_perm,
        "cache_all_layers_s": t_cache,
        "scoring_one_layer_s": t_score,
        "scoring_all_layers_s": num_sparse * t_score,
        "share_of_sparse_step": {f"{d:g}": per_step_overhead / t_sparse[d] for d in densities},
        "share_of_refresh_step": {
            f"{d:g}": (per_step_overhead + num_sparse * t_score) / t_refresh[d] for d in densities
        },
        "share_amortized_over_schedule": overhead_total / sparse_time if sparse_time else 0.0,
        "refresh_minus_sparse_s": {f"{d:g}": t_refresh[d] - t_sparse[d] for d in densities},
    }
    results["schedule"] = {
        "steps": args.steps,
        "dense_steps": int((~plan.sparse).sum()),
        "sparse_steps": int(plan.sparse.sum()),
        "refresh_steps": list(plan.refresh_steps),
        "densities": [float(d) for d in plan.density],
        "composed_dense_s": dense_total,
        "composed_dfs_s": dfs_total,
        "composed_speedup": dense_total / dfs_total,
        "composition": "dense: steps x dense step; dfs: dense steps x dfs-backend dense step + "
                       "each sparse step's time at its density (refresh time at refresh steps)",
        "reported_sparsity": reported_sparsity(plan, cfg.num_layers, dfs.dense_layers),
    }
    results["peak_memory_bytes"] = {"after_dense": peak_dense, "after_dfs_steps": peak_memory_bytes()}

    if args.measure_full:
        noise = x[:1].astype(jnp.float32)
        full = {}
        for name, be in (("dense", "dense"), ("dfs", backend)):
            sampler = Sampler(model, be, progress=False, max_density=args.max_density)
            compile_s = sampler.warmup(noise, text[:1], text[1:], num_steps=args.steps)
            start = time.perf_counter()
            res = sampler(noise, text[:1], text[1:], num_steps=args.steps)
            jax.block_until_ready(res.latents)
            full[name] = {"total_s": time.perf_counter() - start, "warmup_run_s": compile_s,
                          "compiles": sampler.trace_count, "sparsity": res.sparsity}
            full[name]["per_step_s"] = full[name]["total_s"] / args.steps
            print(f"full {args.steps}-step run {name:5s}: {full[name]['total_s']:8.2f} s", flush=True)
        full["speedup"] = full["dense"]["total_s"] / full["dfs"]["total_s"]
        results["measured_full"] = full
        results["peak_memory_bytes"]["after_full_runs"] = peak_memory_bytes()

    default_size = (cfg.name, args.frames, args.height, args.width) == ("wan2.1-1.3b", 81, 480, 832)
    suffix = "" if default_size else f"_{cfg.name}_{args.frames}x{args.height}x{args.width}"
    suffix += f"_{args.schedule}" if args.schedule not in (None, "wan2.1") else ""
    stem = os.path.join(args.out_dir, f"e2e_{device_slug()}{suffix}")
    write_json(stem + ".json", results)
    lines = report(results)
    write_markdown(stem + ".md", lines)
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")
    return results


def report(r: dict) -> list[str]:
    """The Markdown report of a results dict: the per-step table, then the schedule, the full
    runs, the overhead and the peak memory in prose."""
    ps = r["per_step_s"]
    dfs_dense = ps["dfs_dense_step"]
    rows = [("dense (cuDNN on GPU)", f"{ps['dense'] * 1e3:.1f}", "1.00x"),
            ("DFS backend, dense step", f"{dfs_dense * 1e3:.1f}", f"{ps['dense'] / dfs_dense:.2f}x")]
    for kind in ("sparse", "refresh"):
        rows += [(f"DFS {kind}, density {d}", f"{t * 1e3:.1f}", f"{ps['dense'] / t:.2f}x") for d, t in ps[kind].items()]
    lines = [
        f"### Wan2.1 end-to-end ({r['config']}, {r['tokens']} tokens, {r['dtype']}, batch {r['batch']}) "
        f"on {r['card']}",
        "",
        *markdown_table(["step", "time (ms)", "speedup vs dense"], rows, align=("left", "right", "right")),
    ]
    s = r["schedule"]
    o = r["overhead"]
    lines += [
        "",
        f"Full schedule ({s['steps']} steps: {s['dense_steps']} dense + {s['sparse_steps']} sparse, refreshes at "
        f"{s['refresh_steps']}), composed from the per-step times: dense {s['composed_dense_s']:.2f} s, "
        f"DFS {s['composed_dfs_s']:.2f} s, **{s['composed_speedup']:.2f}x** "
        f"(reported sparsity {s['reported_sparsity']:.4f}).",
    ]
    if "measured_full" in r:
        m = r["measured_full"]
        lines.append(
            f"Measured full runs (one jitted program each): dense {m['dense']['total_s']:.2f} s, "
            f"DFS {m['dfs']['total_s']:.2f} s, **{m['speedup']:.2f}x**."
        )
    share = ", ".join(f"{d}: {v * 100:.2f}%" for d, v in o["share_of_sparse_step"].items())
    lines += [
        f"Overhead (permutation + RoPE {o['permutation_and_rope_s'] * 1e3:.2f} ms, cache "
        f"{o['cache_all_layers_s'] * 1e3:.2f} ms per step; scoring {o['scoring_all_layers_s'] * 1e3:.2f} ms per "
        f"refresh step): share of a sparse step {share}; amortized over the schedule "
        f"{o['share_amortized_over_schedule'] * 100:.2f}%.",
    ]
    pm = r["peak_memory_bytes"]
    if pm.get("after_dfs_steps"):
        lines.append(f"Peak GPU memory: {max(v for v in pm.values() if v) / 2**30:.2f} GiB.")
    return lines


if __name__ == "__main__":
    main()
