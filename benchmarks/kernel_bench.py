"""GPU benchmark of the Pallas block-sparse attention kernel against dense cuDNN attention.

For each shape (Wan2.1-1.3B 480p and Wan2.1-14B 720p self-attention, bf16) and density, the
layout comes from DFSAttn itself: video-like q/k (smooth random fields over the latent grid,
see ``models.evaluation.synthetic.synthetic_qkv``) in hilbert3d order, scored with ``block_scores`` and
cut with ``select_blocks``. Reported per (shape, density, kernel variant): median time over
``--repeats`` timed calls (after warm-up, each blocked on its result), TFLOP/s counted over the
visited blocks, speedup over ``jax.nn.dot_product_attention(implementation="cudnn")`` timed in
the same process, and the ideal time ``density × cuDNN``.

Usage (GPU, from the repository root): ``python benchmarks/kernel_bench.py [--shapes 1.3b,14b] [--variants all]``;
needs the package installed (``pip install -e .``).
Writes ``benchmarks/results/kernel_<device_slug>.json`` (e.g. ``kernel_nvidia_h200.json``;
:func:`models.evaluation.results.device_slug`, or ``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from dfsattn_jax.layout import BlockLayout, blocks_for_density, select_blocks
from dfsattn_jax.orders import token_order
from dfsattn_jax.scoring import block_scores
from models.evaluation.results import device_name, device_slug, write_json
from models.evaluation.synthetic import synthetic_qkv
from pallas_kernels.block_sparse_triton import BlockSizes, block_sparse_attention

SHAPES = {
    # name: (grid F×H×W, heads, head_dim)
    "1.3b": ((21, 30, 52), 12, 128),
    "14b": ((21, 45, 80), 40, 128),
    # Control: the 1.3B size rounded to a block multiple (no partial key block).
    "pow2": ((16, 32, 64), 12, 128),
}
DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
VARIANTS = {
    "q128k64w8s3": BlockSizes(128, 64, 8, 3),
    "q128k128w8s2": BlockSizes(128, 128, 8, 2),
    "q128k64w4s3": BlockSizes(128, 64, 4, 3),
    "q64k64w4s3": BlockSizes(64, 64, 4, 3),
    "q64k128w4s2": BlockSizes(64, 128, 4, 2),
    "q128k128w8s3": BlockSizes(128, 128, 8, 3),
}
BLOCK = 128


def median_ms(fn: Callable[[], jax.Array], *, warmup: int, repeats: int) -> tuple[float, float]:
    """Median and spread (IQR) in milliseconds of ``fn()``, each call blocked on its result."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def structured_layouts(
    grid: tuple[int, int, int], heads: int, head_dim: int, densities: Sequence[float], seed: int = 0
) -> tuple[dict[float, BlockLayout], int]:
    """DFSAttn layouts (hilbert3d order, tile-16 scoring) for each density, and nk."""
    length = math.prod(grid)
    base_heads = min(heads, 12)
    q, k, _ = synthetic_qkv(grid, heads=base_heads, head_dim=head_dim, seed=seed)
    perm = jnp.asarray(token_order("hilbert3d", grid))
    reps = -(-heads // base_heads)
    q = jnp.tile(q[:, perm], (1, 1, reps, 1))[:, :, :heads].astype(jnp.bfloat16)
    k = jnp.tile(k[:, perm], (1, 1, reps, 1))[:, :, :heads].astype(jnp.bfloat16)
    scores = jax.jit(block_scores)(q, k)
    nk = scores.shape[-1]
    layouts = {}
    for d in densities:
        layouts[d] = select_blocks(scores, blocks_for_density(d, nk))
    del scores
    assert nk == -(-length // BLOCK)
    return layouts, nk


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.3b,14b")
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    parser.add_argument("--variants", default="q128k128w8s3", help="comma list of VARIANTS keys, or 'all'")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("kernel_bench.py needs a GPU (jax.default_backend() is %r)" % jax.default_backend())
    densities = [float(x) for x in args.densities.split(",")]
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    card = device_name()
    rows = []
    for shape_name in args.shapes.split(","):
        grid, heads, head_dim = SHAPES[shape_name]
        length = math.prod(grid)
        keys = jax.random.split(jax.random.key(1), 3)
        q, k, v = (jax.random.normal(kk, (1, length, heads, head_dim), jnp.bfloat16) for kk in keys)
        dense_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        cudnn_ms, cudnn_iqr = median_ms(lambda: dense_fn(q, k, v), warmup=args.warmup, repeats=args.repeats)
        dense_flops = 4.0 * heads * length * length * head_dim
        print(f"[{shape_name}] L={length} N={heads} D={head_dim}: cuDNN {cudnn_ms:.3f} ms "
              f"({dense_flops / cudnn_ms / 1e9:.0f} TFLOP/s)", flush=True)
        layouts, nk = structured_layouts(grid, heads, head_dim, densities)
        for variant in variants:
            tiles = VARIANTS[variant]
            fn = jax.jit(lambda q, k, v, idx, cnt, tiles=tiles, nk=nk: block_sparse_attention(
                q, k, v, BlockLayout(idx, cnt, nk), block_sizes=tiles))
            # Correctness guard at full density: the kernel must match cuDNN.
            full = layouts.get(1.0)
            if full is not None:
                out = fn(q, k, v, full.kv_indices, full.kv_counts)
                ref = dense_fn(q, k, v)
                err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
                if not err < 2e-2:
                    raise SystemExit(f"{variant}: density-1.0 output differs from cuDNN (rel L2 {err:.3g})")
            for d in densities:
                lay = layouts[d]
                ms, iqr = median_ms(lambda: fn(q, k, v, lay.kv_indices, lay.kv_counts),
                                    warmup=args.warmup, repeats=args.repeats)
                visited = int(jnp.sum(lay.kv_counts))
                flops = 4.0 * visited * BLOCK * BLOCK * head_dim
                row = dict(
                    card=card, jax=jax.__version__, shape=shape_name, seq_len=length, heads=heads,
                    head_dim=head_dim, density=d, kept_blocks=int(lay.kv_counts[0, 0, 0]), num_key_blocks=nk,
                    variant=variant, ms=ms, iqr_ms=iqr, tflops=flops / ms / 1e9, cudnn_ms=cudnn_ms,
                    cudnn_iqr_ms=cudnn_iqr, cudnn_tflops=dense_flops / cudnn_ms / 1e9,
                    speedup_vs_cudnn=cudnn_ms / ms, ideal_ms=d * cudnn_ms,
                )
                rows.append(row)
                print(f"  {variant:>14} density {d:<5} {ms:8.3f} ms ±{iqr:.3f}  {row['tflops']:6.0f} TFLOP/s  "
                      f"{row['speedup_vs_cudnn']:5.2f}x cuDNN  (ideal {row['ideal_ms']:.3f} ms)", flush=True)
    out = args.out or f"benchmarks/results/kernel_{device_slug()}.json"
    write_json(out, rows)
    print(f"\nwrote {out}\n")
    print(markdown_table(rows))
    return 0


def markdown_table(rows: Sequence[dict]) -> str:
    lines = [
        "| shape | L | density | kept/nk | variant | time ms | TFLOP/s | cuDNN ms | speedup | ideal ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['seq_len']} | {r['density']} | {r['kept_blocks']}/{r['num_key_blocks']} | "
            f"{r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['cudnn_ms']:.3f} | "
            f"{r['speedup_vs_cudnn']:.2f}x | {r['ideal_ms']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
