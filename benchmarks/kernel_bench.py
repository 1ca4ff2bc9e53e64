"""GPU benchmark of every block-sparse attention implementation against dense cuDNN attention.

For each shape and density, on the same inputs and layouts, in one process:

* ``cudnn``: dense ``jax.nn.dot_product_attention(implementation="cudnn")`` (the baseline);
* ``triton``, ``mosaic_gpu``: the registered Pallas kernels (``dfsattn_jax.attention``);
* ``flex``: PyTorch FlexAttention (``torch.compile(flex_attention)`` with
  ``BlockMask.from_kv_blocks`` built from the same layout; the partial last key block, when a
  row lists it, goes through a mask_mod, every other block is a full block), when torch with a
  CUDA device is importable.

Layouts: ``dfs`` (DFSAttn itself: video-like q/k of ``models.evaluation.synthetic`` in hilbert3d
order, tile-16 scoring, top-k; Wan shapes) and ``random`` (distinct random key blocks per row,
sorted, the same count in every row). Times: median over ``--repeats`` batches of back-to-back
calls after warm-up, blocked on the result. "TFLOP/s" counts the visited blocks only
(``4 · D · 128² · Σ counts``); speedups are over cuDNN from the same process.

Before timing, every implementation is checked at density 1.0 against cuDNN and at the
sparse densities against the XLA reference on sampled query blocks (relative L2 ≤ 2e-2, bf16).

Usage (GPU, repository root, package installed with ``pip install -e .``)::

    python -m benchmarks.kernel_bench [--shapes 1.3b,14b,hunyuan,1.3b-d64] [--impls triton,mosaic_gpu,flex]

Writes ``benchmarks/results/kernel_<device_slug>.json`` (one record per implementation, shape,
layout and density) and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import RESULTS_DIR, median_time, run_record
from dfsattn_jax.attention import block_sparse_attention
from dfsattn_jax.layout import BlockLayout, blocks_for_density, select_blocks
from dfsattn_jax.orders import token_order
from dfsattn_jax.scoring import block_scores
from models.evaluation.results import device_name, device_slug, write_json
from models.evaluation.synthetic import synthetic_qkv
from models.evaluation.tables import markdown_table

BLOCK = 128
#: name: (sequence length, heads, head dim, video grid for DFS layouts or None)
SHAPES = {
    "1.3b": (32760, 12, 128, (21, 30, 52)),  # Wan2.1-1.3B 480p x 81 frames
    "14b": (75600, 40, 128, (21, 45, 80)),  # Wan2.1-14B 720p x 81 frames
    "hunyuan": (119056, 24, 128, None),  # HunyuanVideo 720p x 129 frames: 118,800 video + 256 text
    "1.3b-d64": (32760, 24, 64, (21, 30, 52)),  # head dim 64, the same FLOPs as 1.3b
}
DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
IMPLS = ("triton", "mosaic_gpu", "flex")
#: Seconds of back-to-back calls per timed repeat.
TARGET_S = 0.2


def random_layout(key: jax.Array, heads: int, nq: int, count: int) -> BlockLayout:
    """``count`` distinct random key blocks per row, sorted ascending (batch 1)."""
    u = jax.random.uniform(key, (1, heads, nq, nq))
    idx = jnp.sort(jnp.argsort(u, axis=-1)[..., :count], axis=-1).astype(jnp.int32)
    return BlockLayout(idx, jnp.full((1, heads, nq), count, jnp.int32), nq)


def dfs_layouts(grid, heads: int, head_dim: int, densities: Sequence[float]) -> dict[float, BlockLayout]:
    """DFSAttn layouts (hilbert3d order, tile-16 scoring) of synthetic video-like q/k."""
    base = min(heads, 12)
    q, k, _ = synthetic_qkv(grid, heads=base, head_dim=head_dim, seed=0)
    perm = jnp.asarray(token_order("hilbert3d", grid))
    reps = -(-heads // base)
    q, k = (jnp.tile(x[:, perm], (1, 1, reps, 1))[:, :, :heads].astype(jnp.bfloat16) for x in (q, k))
    scores = jax.jit(block_scores)(q, k)
    nk = scores.shape[-1]
    return {d: select_blocks(scores, blocks_for_density(d, nk)) for d in densities}


def sampled_error(out, q, k, v, layout: BlockLayout, key: jax.Array, samples: int = 8) -> float:
    """Max relative L2 over sampled (head, query block)s against a float32 softmax over exactly
    the listed keys of that block (gathered, so memory stays small at any L)."""
    _, length, heads, head_dim = q.shape
    nq = layout.num_query_blocks
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    idx, counts = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
    worst = 0.0
    for n, u in zip(rng.integers(0, heads, samples), list(rng.integers(0, nq, samples - 1)) + [nq - 1]):
        blocks = idx[0, n, u, : counts[0, n, u]]
        tokens = (blocks[:, None] * BLOCK + np.arange(BLOCK)[None, :]).reshape(-1)
        tokens = tokens[tokens < length]
        rows = np.arange(u * BLOCK, min((u + 1) * BLOCK, length))
        qq, kk, vv = (x[0, sel, n].astype(jnp.float32) for x, sel in ((q, rows), (k, tokens), (v, tokens)))
        p = jax.nn.softmax(jnp.dot(qq, kk.T, precision="highest") / math.sqrt(head_dim), axis=-1)
        want = np.asarray(jnp.dot(p, vv, precision="highest"), np.float64)
        got = np.asarray(out[0, rows, n], np.float64)
        worst = max(worst, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
    return worst


def flex_runner(q, k, v, layout: BlockLayout):
    """A zero-argument callable running FlexAttention on the layout, or an error string."""
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except Exception as err:  # noqa: BLE001 - torch absent or too old
        return f"torch unavailable: {err}"
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    _, length, heads, _ = q.shape
    nk = layout.num_key_blocks
    idx = np.asarray(layout.kv_indices)
    counts = np.asarray(layout.kv_counts)
    listed = np.arange(idx.shape[-1]) < counts[..., None]
    partial = length % BLOCK != 0
    tail = listed & (idx == nk - 1) if partial else np.zeros_like(listed)
    full = listed & ~tail

    def pack(select):
        num = select.sum(-1).astype(np.int32)
        out = np.zeros(idx.shape[:-1] + (nk,), np.int32)
        for pos in np.ndindex(*idx.shape[:-1]):
            chosen = idx[pos][select[pos]]
            out[pos][: len(chosen)] = chosen
        return torch.from_numpy(num).cuda(), torch.from_numpy(out).cuda()

    full_num, full_idx = pack(full)
    part_num, part_idx = pack(tail)

    def tail_mask(b, h, q_idx, kv_idx):
        return kv_idx < length

    import inspect

    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    sizes = {"BLOCK_SIZE": (BLOCK, BLOCK)} if "BLOCK_SIZE" in params else {"KV_BLOCK_SIZE": BLOCK, "Q_BLOCK_SIZE": BLOCK}
    if "seq_lengths" in params:
        sizes["seq_lengths"] = (length, length)
    mask = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, mask_mod=tail_mask, **sizes)
    tq, tk, tv = (torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    compiled = torch.compile(flex_attention)

    def run():
        out = compiled(tq, tk, tv, block_mask=mask)
        torch.cuda.synchronize()
        return out

    return run, lambda out: jnp.asarray(out.permute(0, 2, 1, 3).float().cpu().numpy())


def bench_shape(name: str, args, impls: Sequence[str], densities: Sequence[float]) -> list[dict]:
    length, heads, head_dim, grid = SHAPES[name]
    nq = -(-length // BLOCK)
    keys = jax.random.split(jax.random.key(20261129), 4)
    q, k, v = (jax.random.normal(kk, (1, length, heads, head_dim), jnp.float32).astype(jnp.bfloat16) for kk in keys[:3])
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    reps = args.repeats if length <= 40000 else max(3, args.repeats // 2)
    cudnn_ms = median_time(cudnn, q, k, v, warmup=args.warmup, repeats=reps, target_s=TARGET_S).median_ms
    dense_flops = 4.0 * heads * length * length * head_dim
    print(f"[{name}] L={length} N={heads} D={head_dim}: cuDNN {cudnn_ms:.3f} ms ({dense_flops / cudnn_ms / 1e9:.0f} TFLOP/s)", flush=True)
    layouts = {"random": {d: random_layout(keys[3], heads, nq, blocks_for_density(d, nq)) for d in densities}}
    if grid is not None and not args.random_only:
        layouts["dfs"] = dfs_layouts(grid, heads, head_dim, densities)
    dense_ref = None
    rows = []
    for impl in impls:
        # One jitted function per implementation: every layout and density reuses its program.
        jitted = jax.jit(lambda q, k, v, i, c, impl=impl: block_sparse_attention(
            q, k, v, BlockLayout(i, c, nq), implementation=impl))
        for kind, by_density in layouts.items():
            for d in densities:
                lay = by_density[d]
                visited = float(jnp.sum(lay.kv_counts))
                record = dict(
                    implementation=impl, shape=name, layout=kind, seq_len=length, heads=heads, head_dim=head_dim,
                    density=d, kept_blocks=int(lay.kv_counts[0, 0, 0]), num_key_blocks=nq,
                    cudnn_ms=cudnn_ms, cudnn_tflops=dense_flops / cudnn_ms / 1e9,
                )
                try:
                    if impl == "flex":
                        made = flex_runner(q, k, v, lay)
                        if isinstance(made, str):
                            raise RuntimeError(made)
                        fn, to_jax = made
                        out = to_jax(fn())
                    else:
                        fn = lambda: jitted(q, k, v, lay.kv_indices, lay.kv_counts)  # noqa: E731
                        out = fn()
                    if d == 1.0:
                        if dense_ref is None:
                            dense_ref = np.asarray(cudnn(q, k, v), np.float32)
                        got = np.asarray(out, np.float32)
                        record["rel_l2_vs_cudnn"] = float(np.linalg.norm(got - dense_ref) / np.linalg.norm(dense_ref))
                        error = record["rel_l2_vs_cudnn"]
                    else:
                        error = sampled_error(out, q, k, v, lay, keys[3])
                        record["sampled_rel_l2"] = error
                    del out
                    if not error < 2e-2:
                        raise RuntimeError(f"wrong result: relative L2 {error:.3g}")
                    timing = median_time(fn, warmup=args.warmup, repeats=reps, target_s=TARGET_S)
                    ms = timing.median_ms
                    record.update(ms=ms, times_ms=timing.times_ms, speedup_vs_cudnn=cudnn_ms / ms,
                                  tflops_per_visited=4.0 * head_dim * BLOCK * BLOCK * visited / ms / 1e9)
                    print(f"  {impl:>10} {kind:>6} d={d:<5} {ms:9.3f} ms {record['tflops_per_visited']:6.0f} TFLOP/s "
                          f"{record['speedup_vs_cudnn']:6.2f}x cuDNN  err {error:.1e}", flush=True)
                except Exception as err:  # noqa: BLE001 - one failing implementation must not stop the run
                    record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    print(f"  {impl:>10} {kind:>6} d={d:<5} FAILED {record['error']}", flush=True)
                rows.append(record)
                if "error" in record and impl == "flex":
                    break  # the same failure would repeat at every density
    return rows


#: The columns of the table (:func:`table`).
COLUMNS = ("shape", "L", "heads×D", "layout", "density", "kept/nk", "implementation", "ms",
           "TFLOP/s per visited block", "cuDNN ms", "speedup vs cuDNN")  # fmt: skip


def table(records: Sequence[dict]) -> list[str]:
    """One Markdown row per record; a failed one says so in its ``ms`` cell."""
    rows = []
    for r in records:
        head = [r["shape"], r["seq_len"], f"{r['heads']}×{r['head_dim']}", r["layout"], r["density"],
                f"{r['kept_blocks']}/{r['num_key_blocks']}", r["implementation"]]  # fmt: skip
        if "ms" not in r:
            rows.append([*head, f"failed: {r.get('error', '')[:60]}", "", "", ""])
        else:
            rows.append([*head, f"{r['ms']:.3f}", f"{r['tflops_per_visited']:.0f}", f"{r['cudnn_ms']:.3f}",
                         f"{r['speedup_vs_cudnn']:.2f}x"])  # fmt: skip
    return markdown_table(COLUMNS, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.3b,14b,hunyuan,1.3b-d64", help=f"comma list of {tuple(SHAPES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    parser.add_argument("--big-densities", default="1.0,0.2,0.1,0.05", help="densities of the 14b and hunyuan shapes")
    parser.add_argument("--random-only", action="store_true", help="skip the DFS layouts")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit(f"kernel_bench.py needs a GPU (jax.default_backend() is {jax.default_backend()!r})")
    impls = [i for i in args.impls.split(",") if i]
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    rows = []
    out = args.out or RESULTS_DIR / f"kernel_{device_slug()}.json"
    meta = run_record(__file__, argv)
    for name in args.shapes.split(","):
        big = SHAPES[name][0] > 40000
        densities = [float(x) for x in (args.big_densities if big else args.densities).split(",")]
        rows += bench_shape(name, args, impls, densities)
        write_json(out, {"device": device_name(), "jax": jax.__version__, "meta": meta, "records": rows})  # per shape
    print(f"\nwrote {out}  ({device_name()}, jax {jax.__version__})\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
