"""What the head-parallel (Ulysses) all-to-alls of one attention layer cost on the GPUs.

In ``heads`` mode (:mod:`models.common.parallel`) every self-attention layer turns q, k, v from
sequence-sharded ``[B, L/h, N, D]`` into head-sharded ``[B, L, N/h, D]`` (three all-to-alls) and
the output back (one more). This script times exactly those collectives
(:meth:`Parallelism._to_heads`, :meth:`Parallelism._to_tokens`) on ``h`` devices at one layer's
shape (default: Wan2.1-14B at 720p x 81, batch 2: ``[2, 75600, 40, 128]`` bf16), beside two
yardsticks of the same size:

``major``
  one all-to-all of the same bytes whose split axis is the most major one (no layout change
  around it): what NCCL alone costs;
``transpose``
  one local copy of one tensor that moves an axis (``[B, L/h, N, D] -> [B, N, L/h, D]``): what each
  layout change XLA inserts around a non-major all-to-all costs.

Before timing, the moved data is checked against NumPy (every element where it must land; on
rows seeded per (token, head)), so a wrong collective cannot be timed. Per op: the median of
``--iters`` timed calls after two warm-up calls, the ops XLA compiled (all-to-all, transposes,
copies: from the optimized HLO) and the bandwidth per device (bytes each device sends / time).
The per-step estimate is ``layers x (q,k,v + out)``. Results as JSON (``--out``), a table last.

    NCCL_NVLS_ENABLE=0 python -m benchmarks.all_to_all_bench --out $OUT/all_to_all.json   # 2 H200s, ~30 s

CPU smoke run (host devices stand in; times mean nothing there)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python -m benchmarks.all_to_all_bench --tokens 512 --heads 4 --head-dim 64 --iters 2
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.harness import median_time, run_record
from models.common.parallel import GUIDANCE_AXIS, HEADS_AXIS, make_parallel
from models.evaluation.results import write_json
from models.evaluation.tables import markdown_table

#: HLO ops counted per compiled program.
HLO_OPS = ("all-to-all", "all-to-all-start", "transpose", "copy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2, help="devices of the heads axis")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=75_600, help="self-attention sequence length L")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=40, help="layers of the per-step estimate (Wan2.1-14B: 40)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON of the results")
    args = p.parse_args(argv)
    for name in ("devices", "batch", "tokens", "heads", "head_dim", "layers", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def hlo_op_counts(compiled_text: str) -> dict[str, int]:
    """How many of each of :data:`HLO_OPS` an optimized HLO text holds."""
    return {op: len(re.findall(rf" {re.escape(op)}\(", compiled_text)) for op in HLO_OPS}


def seeded_tokens(batch: int, tokens: int, heads: int, head_dim: int, dtype, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal ``[B, L, N, D]`` in ``dtype`` (an all-to-all moves bits: compared exactly)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, tokens, heads, head_dim), np.float32).astype(dtype)


def _major_reference(host: np.ndarray, h: int) -> np.ndarray:
    """What ``major`` returns (as ``host``'s shape): device ``j`` gets chunk ``j`` of every device's rows."""
    rows = host.reshape(h, -1)  # device i's local rows, flattened
    chunks = rows.reshape(h, h, -1)  # [source i, destination j, chunk]
    return np.swapaxes(chunks, 0, 1).reshape(host.shape)


def run(args) -> dict:
    parallel = make_parallel(args.devices, "heads")
    parallel.check(batch=args.batch, num_heads=args.heads, num_tokens=args.tokens)
    mesh, h = parallel.mesh, args.devices
    tokens_spec, heads_spec = P(GUIDANCE_AXIS, HEADS_AXIS), P(GUIDANCE_AXIS, None, HEADS_AXIS)
    dtype = jnp.dtype(args.dtype)
    host = seeded_tokens(args.batch, args.tokens, args.heads, args.head_dim, dtype)
    x = jax.device_put(host, NamedSharding(mesh, tokens_spec))
    qkv = (x, x + 1, x + 2)
    x_heads = jax.device_put(host, NamedSharding(mesh, heads_spec))
    flat = jax.device_put(host.reshape(args.batch * args.tokens, -1), NamedSharding(mesh, P(HEADS_AXIS)))

    def mapped(fn, in_specs, out_specs):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))

    to_heads = mapped(lambda q, k, v: tuple(parallel._to_heads(t) for t in (q, k, v)), (tokens_spec,) * 3,
                      (heads_spec,) * 3)
    to_tokens = mapped(parallel._to_tokens, heads_spec, tokens_spec)
    major = mapped(lambda t: jax.lax.all_to_all(t.reshape(h, -1), HEADS_AXIS, 0, 0, tiled=True), P(HEADS_AXIS),
                   P(HEADS_AXIS))
    transpose = mapped(lambda t: jnp.swapaxes(t, 1, 2).copy(), tokens_spec, tokens_spec)

    # The moved data, against NumPy: the global arrays must be unchanged by the round trips.
    q_heads = to_heads(*qkv)[0]
    checks = {
        "to_heads": bool(np.array_equal(np.asarray(q_heads), host)),
        "to_tokens": bool(np.array_equal(np.asarray(to_tokens(q_heads)), host)),
        "major": bool(np.array_equal(np.asarray(major(flat)).reshape(host.shape), _major_reference(host, h))),
    }
    if not all(checks.values()):
        raise RuntimeError(f"an all-to-all moved data to the wrong place: {checks}")

    local_bytes = args.batch * args.tokens * args.heads * args.head_dim * dtype.itemsize / h
    sent_bytes = local_bytes * (h - 1) / h  # per tensor and device: all but the local share
    ops = [("q,k,v to heads", to_heads, qkv, 3), ("out to tokens", to_tokens, (x_heads,), 1),
           ("major (1 tensor)", major, (flat,), 1), ("transpose (1 tensor, local)", transpose, (x,), 0)]
    rows = []
    for name, fn, fn_args, tensors in ops:
        compiled = fn.lower(*fn_args).compile()  # one compile: timed, and its HLO read
        ms = median_time(compiled, *fn_args, warmup=2, repeats=args.iters).median_ms
        rows.append({"op": name, "ms": ms, "tensors_sent": tensors,
                     "gb_per_s_sent": tensors * sent_bytes / ms / 1e6 if tensors else None,
                     "hlo": hlo_op_counts(compiled.as_text())})
        print(f"[a2a] {name}: {ms:.3f} ms  {rows[-1]['hlo']}", flush=True)
    layer_ms = rows[0]["ms"] + rows[1]["ms"]
    return {"meta": run_record(__file__, args.argv), "devices": h,
            "shape": [args.batch, args.tokens, args.heads, args.head_dim],
            "dtype": dtype.name, "local_gb_per_tensor": local_bytes / 1e9, "sent_gb_per_tensor": sent_bytes / 1e9,
            "data_checks": checks, "ops": rows, "layer_ms": layer_ms, "layers": args.layers,
            "step_ms": args.layers * layer_ms, "step_sent_gb": args.layers * 4 * sent_bytes / 1e9}


def table(result: dict) -> list[str]:
    """One Markdown row per op (time, bandwidth, the HLO ops compiled), then the per-step estimate."""
    rows = []
    for r in result["ops"]:
        a2a = r["hlo"]["all-to-all"] + r["hlo"]["all-to-all-start"]
        bw = "" if r["gb_per_s_sent"] is None else f"{r['gb_per_s_sent']:.0f}"
        rows.append([r["op"], f"{r['ms']:.2f}", bw, a2a, r["hlo"]["transpose"], r["hlo"]["copy"]])
    headers = ["op", "ms", "GB/s sent per device", "all-to-all", "transposes", "copies"]
    return [
        *markdown_table(headers, rows, align=("left", *["right"] * 5)),
        "",
        f"per layer {result['layer_ms']:.2f} ms; per step ({result['layers']} layers) "
        f"{result['step_ms']:.0f} ms for {result['step_sent_gb']:.1f} GB sent per device",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    result = run(args)
    if args.out:
        write_json(args.out, result)
    print(f"\n{result['meta']['device']} x {result['devices']}, {result['shape']} {result['dtype']}:")
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
