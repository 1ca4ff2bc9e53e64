"""Sharded vs single-device sampling on the GPUs: the same latents and the same DFS masks.

The CPU tests (tests/models/common/test_parallel.py) check this on host devices with the XLA attention; this
script checks the GPU path: the Pallas kernel (Mosaic GPU on Hopper in bf16, Triton in float32)
and cuDNN inside ``shard_map``, and the all-to-alls over NCCL. A Wan2.1 architecture cut to a
few layers (``--layers``), random weights, a short DFS schedule with dense, refresh and sparse
steps; for every parallel mode that fits the devices, the relative L2 distance of the final
latents to the single-device run, the share of mask-cache entries that agree, and the number
of compiled programs after two runs of different schedules (must be 1).

Each sharded run is checked (:func:`evaluate`) and printed ``PASS`` or ``FAIL``: it fails when
its latents or the single-device run's are not finite, when DFS's relative L2 exceeds
:data:`DFS_OVER_DENSE` times the dense backend's of the same mode and dtype (the sharded dense
run's distance is the rounding noise of the partitioning; DFS may add mask flips but no more),
or when fewer than :data:`MIN_MASK_AGREEMENT` of the mask rows agree. Any failure: exit status 3
(after the JSON is written).

    python -m benchmarks.multi_gpu_check --out $OUT/multi_check.json
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import run_record
from dfsattn_jax.dispatch import resolve
from dfsattn_jax.metrics import attention_error
from dfsattn_jax.schedule import DFSConfig
from models.common.parallel import PARALLEL_MODES, make_parallel
from models.common.processor import AttentionBackend
from models.evaluation.results import write_json
from models.sampling.loop import Sampler
from models.wan.config import get_config, latent_shape, token_grid
from models.wan.transformer import WanTransformer3DModel


#: A sharded DFS run may be at most this many times farther from one device than dense is.
DFS_OVER_DENSE = 3.0
#: Smallest allowed dense distance in that bound: a dense distance of 0 (bit-identical
#: partitions) would otherwise fail any rounding; 1e-5 is the float32 tolerance of the CPU tests.
REL_L2_FLOOR = 1e-5
#: Smallest share of mask rows that must agree with one device.
MIN_MASK_AGREEMENT = 0.99


def evaluate(checks: list[dict]) -> bool:
    """Sets ``passed`` and ``failures`` (reasons) on every check; returns whether all passed.

    A check (one sharded run against one device) has ``dtype``, ``backend``, ``parallel``,
    ``rel_l2`` (one per run), ``latents_finite`` (the sharded runs and the single-device ones)
    and, for DFS, ``mask_counts_agree``. DFS's ``rel_l2[i]`` is bounded by
    ``DFS_OVER_DENSE * max(dense rel_l2[i], REL_L2_FLOOR)`` of the dense check with the same
    dtype and parallel mode; without that dense check the bound is not applied (said in
    ``notes``).
    """
    dense = {(c["dtype"], c["parallel"]): c for c in checks if c["backend"] == "dense"}
    for check in checks:
        failures, notes = [], []
        if not all(check["latents_finite"]):
            failures.append("non-finite latents")
        errors = check["rel_l2"]
        if any(not math.isfinite(e) for e in errors):
            failures.append("non-finite rel L2")
        if check["backend"] == "dfs":
            ref = dense.get((check["dtype"], check["parallel"]))
            if ref is None:
                notes.append("no dense check of this dtype and mode: rel L2 not bounded")
            else:
                bounds = [DFS_OVER_DENSE * max(e, REL_L2_FLOOR) for e in ref["rel_l2"]]
                over = [(e, b) for e, b in zip(errors, bounds) if not e <= b]
                if over:
                    failures.append("rel L2 " + ", ".join(f"{e:.2e} > {b:.2e}" for e, b in over)
                                    + f" ({DFS_OVER_DENSE:g}x dense)")
            agree = check.get("mask_counts_agree")
            if agree is None or not agree >= MIN_MASK_AGREEMENT:
                failures.append(f"mask rows agree {_share(agree)} < {MIN_MASK_AGREEMENT}")
        check["failures"] = failures
        check["passed"] = not failures
        if notes:
            check["notes"] = notes
    return all(c["passed"] for c in checks)


def verdict_line(check: dict) -> str:
    """``PASS``/``FAIL`` and what was compared, for one evaluated check."""
    head = "PASS" if check["passed"] else "FAIL"
    errors = " / ".join(f"{e:.2e}" for e in check["rel_l2"])
    why = f": {'; '.join(check['failures'])}" if check["failures"] else ""
    return (f"{head} {check['dtype']:9s} {check['backend']:5s} {check['parallel']:14s} rel L2 {errors}  mask rows "
            f"agree {_share(check.get('mask_counts_agree'))}  latents finite {check['latents_finite']}{why}")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def finite(x) -> bool:
    return bool(np.isfinite(np.asarray(x)).all())


def same_rows(a, b) -> float:
    """Share of mask-cache rows (layer, batch, head, query block) listing the same key blocks."""
    counts_a, counts_b = np.asarray(a.kv_counts), np.asarray(b.kv_counts)
    idx_a, idx_b = np.asarray(a.kv_indices), np.asarray(b.kv_indices)
    visited = np.arange(idx_a.shape[-1]) < counts_a[..., None]
    same = np.all((idx_a == idx_b) | ~visited, axis=-1) & (counts_a == counts_b)
    return float(np.mean(same))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="wan2.1-1.3b")
    p.add_argument("--layers", type=int, default=4, help="keep only this many transformer blocks")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = get_config(args.config).replace(num_layers=args.layers)
    shape = latent_shape(cfg, args.frames, args.height, args.width)
    num_tokens = math.prod(token_grid(cfg, shape[1:]))
    dfs = DFSConfig(density=0.5, density_decrement=0.2, dense_steps=1, refresh_interval=2,
                    tile_size=args.tile_size, block_size=args.block_size)
    other = DFSConfig(density=0.4, density_decrement=0.0, dense_steps=2, refresh_interval=3,
                      tile_size=args.tile_size, block_size=args.block_size)
    count = jax.device_count()
    parallels = {}
    for mode in PARALLEL_MODES[1:]:
        par = make_parallel(count, mode)
        if par is None:
            continue
        try:  # the guided batch of one prompt is 2
            par.check(batch=2, num_heads=cfg.num_heads, num_tokens=num_tokens)
        except ValueError:
            continue
        parallels[str(par)] = par
    print(f"{cfg.name} cut to {cfg.num_layers} layers, {num_tokens} tokens, {count} x {jax.devices()[0].device_kind}; "
          f"modes {list(parallels)}", flush=True)
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((1, *shape), np.float32))
    texts = [jnp.asarray(rng.standard_normal((1, 32, cfg.text_dim), np.float32)) for _ in range(2)]
    results: dict = {"meta": run_record(__file__, argv), "config": cfg.name, "layers": cfg.num_layers,
                     "tokens": num_tokens, "checks": []}
    for dtype in args.dtypes.split(","):
        model = WanTransformer3DModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
        q = jnp.zeros((1, num_tokens, cfg.num_heads, cfg.head_dim), dtype)
        impl = resolve("attention", q, block_size=args.block_size)
        for backend in ("dense", "dfs"):
            be = AttentionBackend(backend, dfs if backend == "dfs" else None)
            runs = {}
            for name, par in {"1 device": None, **parallels}.items():
                sampler = Sampler(model, be, parallel=par, progress=False)
                first = sampler(noise, texts[0].astype(dtype), texts[1].astype(dtype), num_steps=args.steps)
                second = sampler(noise, texts[0].astype(dtype), texts[1].astype(dtype), num_steps=args.steps + 1,
                                 dfs=other if backend == "dfs" else None)
                runs[name] = (first, second, sampler.trace_count)
            ref = runs["1 device"]
            for name, (first, second, traces) in runs.items():
                if name == "1 device":
                    continue
                errors = [float(attention_error(a.latents, b.latents)) for a, b in ((first, ref[0]), (second, ref[1]))]
                agree = None if first.cache is None else same_rows(first.cache, ref[0].cache)
                check = {"dtype": dtype, "backend": backend, "parallel": name, "sparse_implementation": impl[0],
                         "rel_l2": errors, "mask_counts_agree": agree, "programs": traces,
                         "refreshes_equal": bool(np.array_equal(first.refreshed, ref[0].refreshed)),
                         "latents_finite": [finite(r.latents) for r in (first, second, ref[0], ref[1])]}
                results["checks"].append(check)
                print(f"{dtype:9s} {backend:5s} {name:14s} rel L2 {errors[0]:.2e} / {errors[1]:.2e}  mask rows agree "
                      f"{agree}  programs {traces}  (sparse kernel {impl[0]})", flush=True)
        del model
    results["passed"] = evaluate(results["checks"])
    if args.out:
        write_json(args.out, results)
    print()
    for check in results["checks"]:
        print(verdict_line(check), flush=True)
    print("all checks passed" if results["passed"] else "!!! SOME CHECKS FAILED", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 3)
