"""HunyuanVideo end to end: denoising steps dense (cuDNN) vs DFSAttn, 13B architecture, random weights.

Default: HunyuanVideo-T2V-13B at 720x1280, 129 frames (33x45x80 = 118,800 video tokens + 256
text tokens, 30 of them valid), bf16, batch 1 (embedded guidance: one forward per step).
Measures, after compilation (the first call of each program is timed apart as compile + run):

- a dense step (the ``dense`` backend: cuDNN attention with the padded text masked out by the
  per-sample key lengths, raster order, no cache), and a dense step of the ``dfs`` backend
  (hilbert3d order, cache passed through);
- per density (default 0.3, 0.2, 0.1, the default schedule's): a refresh step (scoring +
  joint selection + sparse attention) and a sparse step reusing the cached layouts;
- one layer's attention alone: cuDNN dense with key lengths, and the joint sparse attention
  (kernel + dense text rows) per density;
- overhead pieces: video permutation + joint RoPE tables (per step), mask-cache reads/writes of
  all 60 layers (per step), scoring + joint selection of one layer (per layer per refresh);
- peak GPU memory.

Then it composes the reference's default 50-step schedule (``get_schedule_preset("hunyuan-video")``: 12
dense steps, refreshes at 12, 24, 36 at 0.3, 0.2, 0.1) from the per-step times. Writes
``hunyuan_<device_slug>_<frames>x<height>x<width>.json`` and ``.md`` to ``--out-dir`` and prints
the table last. Helpers are shared with :mod:`benchmarks.e2e_bench`.

GPU (one H200; each size fits one ~10-minute call)::

    python -m benchmarks.hunyuan_bench --out-dir $OUT                          # 720p x 129
    python -m benchmarks.hunyuan_bench --height 544 --width 960 --out-dir $OUT  # 544p x 129

CPU smoke test of the script (the tiny config, 16-token blocks)::

    JAX_PLATFORMS=cpu python -m benchmarks.hunyuan_bench --config tiny --frames 9 --height 64 \
        --width 96 --text-len 24 --valid-text 7 --block-size 16 --tile-size 4 --out-dir /tmp/hy
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

from benchmarks.e2e_bench import cache_round_trip, measured_blocks
from benchmarks.harness import RESULTS_DIR, first_call, median_time, peak_memory_bytes, run_record, write_markdown
from dfsattn_jax.attention import dense_attention
from dfsattn_jax.dispatch import resolve
from dfsattn_jax.joint import JointTokens, joint_attention, joint_density, select_joint_blocks
from dfsattn_jax.layout import blocks_for_density
from dfsattn_jax.schedule import get_schedule_preset, plan_schedule, reported_sparsity
from dfsattn_jax.scoring import block_scores
from models.common.layers import default_dtype, patchify
from models.common.processor import (
    AttentionBackend,
    AttentionState,
    dense_step,
    init_cache,
    skipped_fraction,
    sparse_step,
    token_permutation,
)
from models.evaluation.results import device_name, device_slug, write_json
from models.evaluation.speed import compose_schedule
from models.evaluation.tables import markdown_table
from models.hunyuan_video.config import get_config, latent_shape, token_grid
from models.hunyuan_video.transformer import (
    HunyuanConditioning,
    HunyuanVideoTransformer3DModel,
    joint_rope_tables,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="hunyuan-video-13b")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--text-len", type=int, default=256, help="padded text tokens (the pipeline's 256)")
    p.add_argument("--valid-text", type=int, default=30, help="valid text tokens (a short prompt)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.2, 0.1])
    p.add_argument("--steps", type=int, default=50, help="schedule length composed")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=16)
    p.add_argument("--max-density", type=float, default=0.5, help="mask-cache capacity, as the sampler's")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs after the compiling first call")
    p.add_argument("--iters", type=int, default=1, help="timed runs (median)")
    p.add_argument("--skip-dfs-dense", action="store_true", help="compose dense steps from the dense backend")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: bf16 on GPU, f32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def _log(text: str) -> None:
    print(text, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = get_config(args.config)
    dtype = jnp.dtype(args.dtype) if args.dtype else default_dtype()
    dfs = dataclasses.replace(get_schedule_preset("hunyuan-video"), tile_size=args.tile_size, block_size=args.block_size)
    shape = latent_shape(cfg, args.frames, args.height, args.width)
    grid = token_grid(cfg, shape[1:])
    joint = JointTokens(math.prod(grid), args.text_len)
    nk, vs, bs = joint.num_blocks(dfs.block_size), joint.video_blocks(dfs.block_size), dfs.block_size
    plan = plan_schedule(dfs, args.steps, nk)
    blocks = measured_blocks(args.densities, plan, nk)
    densities = sorted(blocks, reverse=True)
    max_blocks = min(nk, max([*blocks.values(), blocks_for_density(args.max_density, nk), joint.min_capacity(bs)]))
    backend = AttentionBackend("dfs", dfs)
    layers = cfg.num_layers
    _log(f"{cfg.name} {args.frames}x{args.height}x{args.width}: grid {grid}, joint {joint} = {joint.length} tokens, "
         f"{nk} blocks ({vs} video-only), valid text {args.valid_text}, dtype {dtype.name}, device {device_name()}")

    start = time.perf_counter()
    model = HunyuanVideoTransformer3DModel(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    _log(f"random init: {params / 1e9:.2f} B parameters in {init_s:.1f} s; peak memory {_gib(peak_memory_bytes())}")

    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((1, *shape), np.float32), dtype)
    t = jnp.asarray([500.0], jnp.float32)
    mask = (np.arange(args.text_len) < args.valid_text).astype(np.int32)[None]
    cond = HunyuanConditioning(
        jnp.asarray(rng.standard_normal((1, args.text_len, cfg.text_dim), np.float32), dtype),
        jnp.asarray(mask), jnp.asarray(rng.standard_normal((1, cfg.pooled_dim), np.float32), dtype),
        jnp.asarray([6.0], jnp.float32),
    )  # fmt: skip
    kv_lengths = jnp.asarray([joint.video_len + args.valid_text], jnp.int32)

    @jax.jit
    def dense_fwd(state, x, t, cond):
        return nnx.merge(graphdef, state).forward(x, t, cond, backend="dense")[0]

    @jax.jit
    def dfs_fwd(state, x, t, cond, control, cache):
        out, st = nnx.merge(graphdef, state).forward(
            x, t, cond, backend=backend, state=AttentionState(control=control, cache=cache)
        )
        return out, st.cache

    def seconds(fn, *fn_args, warmup=args.warmup, repeats=args.iters) -> float:
        return median_time(fn, *fn_args, warmup=warmup, repeats=repeats).median_s

    results: dict = {"compile_and_first_run_s": {}}
    _, results["compile_and_first_run_s"]["dense"] = first_call(dense_fwd, state, x, t, cond)
    t_dense = seconds(dense_fwd, state, x, t, cond)
    peak_dense = peak_memory_bytes()
    _log(f"dense step (cuDNN, key lengths) {t_dense:9.3f} s   (first call {results['compile_and_first_run_s']['dense']:.1f} s)")

    cache0 = init_cache(backend, layers, 1, cfg.num_heads, joint.length, max_blocks, joint=joint)
    t_sparse, t_refresh, measured_skip = {}, {}, {}
    for i, d in enumerate(densities):
        refresh = sparse_step(blocks[d], refresh=True)
        (_, cache_d), first = first_call(dfs_fwd, state, x, t, cond, refresh, cache0)
        if i == 0:
            results["compile_and_first_run_s"]["dfs"] = first
        t_refresh[d] = seconds(dfs_fwd, state, x, t, cond, refresh, cache0)
        t_sparse[d] = seconds(dfs_fwd, state, x, t, cond, sparse_step(blocks[d], refresh=False), cache_d)
        measured_skip[d] = float(skipped_fraction(cache_d, layers, joint=joint, block_size=bs))
        planned = 1.0 - joint_density(blocks[d], joint, bs)
        _log(f"density {d:.2f} (k={blocks[d]:4d}/{nk}): sparse {t_sparse[d]:8.3f} s ({t_dense / t_sparse[d]:.2f}x)  "
             f"refresh {t_refresh[d]:8.3f} s  skipped {measured_skip[d]:.4f} (planned {planned:.4f})")
        if abs(measured_skip[d] - planned) > 1e-3:
            _log(f"WARNING: the layouts skip {measured_skip[d]:.4f}, the plan {planned:.4f} (non-finite scores?)")
    if args.skip_dfs_dense:
        t_dfs_dense = t_dense
    else:
        t_dfs_dense = seconds(dfs_fwd, state, x, t, cond, dense_step(), cache0)
        _log(f"dfs backend, dense step        {t_dfs_dense:9.3f} s")
    peak_dfs = peak_memory_bytes()

    # One layer's attention, and the overhead pieces, on random q/k/v of the joint shape.
    qkv = [jnp.asarray(rng.standard_normal((1, joint.length, cfg.num_heads, cfg.head_dim), np.float32), dtype)
           for _ in range(3)]  # fmt: skip
    impl, why = resolve("attention", qkv[0], block_size=bs)
    _log(f"sparse attention implementation: {impl} ({why})")

    @jax.jit
    def score_only(q, k, num_blocks):
        scores = block_scores(q, k, tile_size=dfs.tile_size, block_size=bs, kv_lengths=kv_lengths)
        return select_joint_blocks(scores, num_blocks, joint=joint, block_size=bs, max_blocks=max_blocks,
                                   kv_lengths=kv_lengths)  # fmt: skip

    @jax.jit
    def joint_only(q, k, v, layout):
        return joint_attention(q, k, v, layout, joint=joint, block_size=bs, kv_lengths=kv_lengths)

    dense_one = jax.jit(lambda q, k, v: dense_attention(q, k, v, kv_lengths=kv_lengths))
    t_attn = {"dense_cudnn": seconds(dense_one, *qkv, warmup=1, repeats=3)}
    for d in densities:
        layout = score_only(qkv[0], qkv[1], jnp.asarray(blocks[d], jnp.int32))
        t_attn[f"{d:g}"] = seconds(joint_only, *qkv, layout, warmup=1, repeats=3)
        _log(f"one layer's attention at {d:.2f}: {t_attn[f'{d:g}'] * 1e3:8.2f} ms (dense cuDNN "
             f"{t_attn['dense_cudnn'] * 1e3:.2f} ms, {t_attn['dense_cudnn'] / t_attn[f'{d:g}']:.2f}x)")
    t_score = seconds(score_only, qkv[0], qkv[1], jnp.asarray(blocks[densities[0]], jnp.int32), warmup=1, repeats=3)

    order = token_permutation(dfs.order, grid)
    patches = patchify(x, cfg.patch_size)

    @jax.jit
    def permute_only(p):
        cos, sin = joint_rope_tables(cfg, grid, order.perm, joint.text_len)
        return order.restore(order.apply(p)), cos, sin

    cache_only = cache_round_trip(nk)
    t_perm = seconds(permute_only, patches, warmup=1, repeats=3)
    t_cache = seconds(cache_only, cache0, warmup=1, repeats=3)
    per_step_overhead = t_perm + t_cache

    step_times = compose_schedule(plan, t_dfs_dense, t_sparse, t_refresh)
    dense_total, dfs_total = args.steps * t_dense, float(sum(step_times))
    sparse_steps = int(plan.sparse.sum())
    overhead_total = sparse_steps * per_step_overhead + len(plan.refresh_steps) * layers * t_score
    results.update({
        "meta": run_record(__file__, argv),
        "config": cfg.name, "card": device_name(), "backend": jax.default_backend(), "jax_version": jax.__version__,
        "python": platform.python_version(), "dtype": dtype.name, "parameters": params, "random_init_s": init_s,
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "token_grid": list(grid), "joint": joint._asdict(), "valid_text": args.valid_text, "batch": 1,
        "num_key_blocks": nk, "video_blocks": vs, "kept_blocks": {f"{d:g}": blocks[d] for d in densities},
        "cache_max_blocks": max_blocks, "dfs_config": dataclasses.asdict(dfs),
        "sparse_implementation": {"name": impl, "reason": why},
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median"},
        "attention_one_layer_s": t_attn,
        "skipped_measured": {f"{d:g}": v for d, v in measured_skip.items()},
    })  # fmt: skip
    results["per_step_s"] = {
        "dense": t_dense, "dfs_dense_step": t_dfs_dense,
        "sparse": {f"{d:g}": t_sparse[d] for d in densities}, "refresh": {f"{d:g}": t_refresh[d] for d in densities},
    }  # fmt: skip
    results["speedup_per_sparse_step"] = {f"{d:g}": t_dense / t_sparse[d] for d in densities}
    results["overhead"] = {
        "permutation_and_rope_s": t_perm, "cache_all_layers_s": t_cache, "scoring_one_layer_s": t_score,
        "scoring_all_layers_s": layers * t_score, "total_over_schedule_s": overhead_total,
        "share_of_schedule": overhead_total / dfs_total,
        "refresh_minus_sparse_s": {f"{d:g}": t_refresh[d] - t_sparse[d] for d in densities},
    }  # fmt: skip
    results["schedule"] = {
        "steps": args.steps, "dense_steps": int((~plan.sparse).sum()), "sparse_steps": sparse_steps,
        "refresh_steps": list(plan.refresh_steps), "composed_dense_s": dense_total, "composed_dfs_s": dfs_total,
        "composed_speedup": dense_total / dfs_total,
        "reported_sparsity": reported_sparsity(plan, layers, dfs.dense_layers, joint=joint, block_size=bs),
        "composition": "dense: steps x dense step; dfs: dense steps x dfs-backend dense step + each sparse "
                       "step's time at its density (refresh time at refresh steps)",
    }  # fmt: skip
    results["peak_memory_bytes"] = {"after_dense": peak_dense, "after_dfs_steps": peak_dfs, "end": peak_memory_bytes()}

    stem = os.path.join(args.out_dir, f"hunyuan_{device_slug()}_{cfg.name}_{args.frames}x{args.height}x{args.width}")
    write_json(stem + ".json", results)
    lines = report(results)
    write_markdown(stem + ".md", lines)
    _log(f"wrote {stem}.json and {stem}.md")
    print("\n".join(lines))
    return results


def _gib(value) -> str:
    return "n/a" if not value else f"{value / 2**30:.1f} GiB"


def report(r: dict) -> list[str]:
    """The Markdown report of a results dict: the per-step table, then the schedule, one layer's
    attention, the overhead and the memory in prose."""
    ps, s, o, v = r["per_step_s"], r["schedule"], r["overhead"], r["video"]
    rows = [("dense (cuDNN, padded text masked)", f"{ps['dense']:.3f}", "1.00x"),
            ("DFS backend, dense step", f"{ps['dfs_dense_step']:.3f}", f"{ps['dense'] / ps['dfs_dense_step']:.2f}x")]
    rows += [(f"DFS sparse, density {d} (k={r['kept_blocks'][d]})", f"{t:.3f}", f"{ps['dense'] / t:.2f}x")
             for d, t in ps["sparse"].items()]  # fmt: skip
    rows += [(f"DFS refresh, density {d}", f"{t:.3f}", f"{ps['dense'] / t:.2f}x") for d, t in ps["refresh"].items()]
    lines = [
        f"### HunyuanVideo end to end ({r['config']}, {v['height']}x{v['width']}x{v['frames']}, "
        f"{r['joint']['video_len']} video + {r['joint']['text_len']} text tokens ({r['valid_text']} valid), "
        f"{r['dtype']}, batch 1, random weights) on {r['card']}, sparse kernel {r['sparse_implementation']['name']}",
        "",
        *markdown_table(["step", "time (s)", "speedup vs dense"], rows, align=("left", "right", "right")),
    ]
    attn = r["attention_one_layer_s"]
    per_layer = ", ".join(f"{d}: {attn[d] * 1e3:.1f} ms" for d in ps["sparse"])
    pm = [x for x in r["peak_memory_bytes"].values() if x]
    lines += [
        "",
        f"Default {s['steps']}-step schedule ({s['dense_steps']} dense + {s['sparse_steps']} sparse, refreshes at "
        f"{s['refresh_steps']}), composed: dense {s['composed_dense_s']:.1f} s, DFS {s['composed_dfs_s']:.1f} s, "
        f"**{s['composed_speedup']:.2f}x** (reported sparsity {s['reported_sparsity']:.4f}).",
        f"One layer's attention: cuDNN {attn['dense_cudnn'] * 1e3:.1f} ms; joint sparse {per_layer}.",
        f"Overhead: permutation + RoPE {o['permutation_and_rope_s'] * 1e3:.2f} ms and cache "
        f"{o['cache_all_layers_s'] * 1e3:.2f} ms per step, scoring {o['scoring_all_layers_s']:.3f} s per refresh "
        f"step: {o['share_of_schedule'] * 100:.2f}% of the schedule.",
        f"Peak GPU memory {max(pm) / 2**30:.1f} GiB; random init {r['random_init_s']:.0f} s; first calls "
        f"(compile + run): dense {r['compile_and_first_run_s']['dense']:.0f} s, DFS "
        f"{r['compile_and_first_run_s']['dfs']:.0f} s." if pm else "Peak GPU memory: n/a.",
    ]
    return lines


if __name__ == "__main__":
    main()
