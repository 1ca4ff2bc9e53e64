"""Benchmark of the block scorers (docs/spec.md §3) against one dense cuDNN attention call.

For each shape (batch 1), in one process:

* ``cudnn``: one dense ``jax.nn.dot_product_attention(implementation="cudnn")`` call on the same
  B, N, L (XLA off GPU): the yardstick of the "share" column;
* ``jnp``: the float32 jnp scorer (``block_scores(implementation="jnp")``);
* ``triton/<precision>``: the whole fused scorer (tile means + kernel) at each logit precision,
  default tiling;
* ``triton/bf16/<tiling>``: the same with other kernel tilings (``TILINGS``);
* ``kernel only``: the default kernel on precomputed tile means (what the means cost is the
  difference);
* ``+select``: the default scorer followed by ``select_blocks`` at density 0.2.

Then, once: the same agreement on the q, k of the shipped small video DiT (every layer of a dense
``--harness-steps``-step sampling run with guidance, hilbert3d order).

Each is timed as the median of ``--repeats`` batches of back-to-back calls after warm-up,
blocked on the result; "temp" is the compiled program's temporary memory
(``memory_analysis().temp_size_in_bytes``). Agreement: the share of top-k (row, key block)
decisions at densities 0.3, 0.2, 0.1 that each precision shares with the jnp float32 scorer, on
video-like q/k (``models.evaluation.synthetic``, hilbert3d order, bf16) on the shape's token grid
(12 heads at 1.3B, 4 at 14B: generating them is CPU work). A stage that fails is recorded with its error and the run goes on.

Usage (repository root)::

    python -m benchmarks.score_bench --out $OUT/score.json                 # H200: 1.3b and 14b
    python -m benchmarks.score_bench --shapes tiny --repeats 2 --harness-steps 2 \
        --harness-clip 8,32,32 --out /tmp/score.json                       # CPU smoke

Off GPU the kernel runs in the Pallas interpreter (correct, not fast) and the dense call is XLA.
Writes JSON to ``--out`` (default ``benchmarks/results/score_<device>.json``) and prints a
markdown table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import RESULTS_DIR, median_time, run_record
from dfsattn_jax.layout import blocks_for_density, select_blocks
from dfsattn_jax.metrics import selection_agreement
from dfsattn_jax.orders import token_order
from dfsattn_jax.dispatch import resolve
from dfsattn_jax.scoring import block_scores, tile_means
from models.common.processor import AttentionBackend, AttentionHooks
from models.evaluation.clips import clip_classes
from models.evaluation.results import device_name, device_slug, write_json
from models.evaluation.small_dit import load_small_dit
from models.sampling.loop import Sampler
from models.evaluation.synthetic import synthetic_qkv
from models.evaluation.tables import markdown_table
from pallas_kernels.block_scores_triton import DEFAULT_PRECISION, PRECISIONS, ScoreTuning, tile_block_scores

TILE, BLOCK = 16, 128
#: name: (sequence length, heads, head dim, token grid (F, H, W), heads of the agreement q/k)
SHAPES = {
    "1.3b": (32760, 12, 128, (21, 30, 52), 12),  # Wan2.1-1.3B 480p x 81 frames
    "14b": (75600, 40, 128, (21, 45, 80), 4),  # Wan2.1-14B 720p x 81 frames (4 heads: 1.4 M decisions)
    "tiny": (2048, 2, 64, (4, 16, 32), 2),  # CPU smoke test
}
#: Kernel tilings tried at bf16 besides the default (ScoreTuning()).
TILINGS = {
    "q64s3": ScoreTuning(block_q=64, block_k=128, num_warps=4, num_stages=3),
    "q32": ScoreTuning(block_q=32, block_k=128, num_warps=4, num_stages=2),
    "q128": ScoreTuning(block_q=128, block_k=128, num_warps=8, num_stages=2),
    "q128dot": ScoreTuning(block_q=128, block_k=128, num_warps=8, num_stages=2, row_sum="dot"),
}
DENSITIES = (0.3, 0.2, 0.1)


def temp_bytes(compiled) -> int | None:
    """Temporary memory of a compiled program (``None`` where the backend does not say)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


class Runner:
    """Times stages, records each (or its error) and keeps going."""

    def __init__(self, shape: str, *, warmup: int, repeats: int, target_s: float):
        self.shape = shape
        self.warmup, self.repeats, self.target_s = warmup, repeats, target_s
        self.records: list[dict] = []

    def time(self, name: str, fn: Callable, *args, **extra) -> dict:
        record = {"shape": self.shape, "variant": name, **extra}
        start = time.perf_counter()
        try:
            compiled = jax.jit(fn).lower(*args).compile()
            record["compile_s"] = time.perf_counter() - start
            timing = median_time(compiled, *args, warmup=self.warmup, repeats=self.repeats, target_s=self.target_s)
            record.update(ms=timing.median_ms, times_ms=timing.times_ms, temp_bytes=temp_bytes(compiled))
        except Exception as err:  # noqa: BLE001 - record and go on
            record["error"] = f"{type(err).__name__}: {err}"[:2000]
            traceback.print_exc()
        record["stage_s"] = time.perf_counter() - start
        self.records.append(record)
        status = f"{record['ms']:.4f} ms" if "ms" in record else record["error"][:200]
        print(f"[{self.shape}] {name}: {status} ({record['stage_s']:.1f} s)", flush=True)
        return record


def video_like_qk(grid, heads: int, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Synthetic video-like q, k (bf16, hilbert3d order) on ``grid``."""
    q, k, _ = synthetic_qkv(grid, heads=heads, head_dim=head_dim, seed=0)
    perm = jnp.asarray(token_order("hilbert3d", grid))
    return q[:, perm].astype(jnp.bfloat16), k[:, perm].astype(jnp.bfloat16)


def agreement_by_density(scores, reference) -> dict[str, jax.Array]:
    """``{density: share of (row, block) top-k decisions of scores that match reference's}``, per :data:`DENSITIES`."""
    nk = reference.shape[-1]
    return {str(d): selection_agreement(scores, reference, blocks_for_density(d, nk)) for d in DENSITIES}


def agreement(grid, heads: int, head_dim: int, precisions: Sequence[str], interpret: bool) -> dict:
    """Top-k agreement of each precision with the jnp float32 scorer, per density."""
    q, k = video_like_qk(grid, heads, head_dim)
    reference = jax.jit(functools.partial(block_scores, implementation="jnp"))(q, k)
    out = {}
    for precision in precisions:
        try:
            scores = jax.jit(
                functools.partial(block_scores, implementation="triton", precision=precision, interpret=interpret)
            )(q, k)
            out[precision] = {d: float(v) for d, v in agreement_by_density(scores, reference).items()}
        except Exception as err:  # noqa: BLE001
            out[precision] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        print(f"[agreement] {precision}: {out[precision]}", flush=True)
    return out


@dataclasses.dataclass(frozen=True)
class AgreementHooks(AttentionHooks):
    """Probes every layer's q, k (hilbert3d order): top-k agreement of the kernel at each
    precision with the jnp float32 scorer, per density."""

    precisions: tuple[str, ...]
    interpret: bool

    def keys(self) -> list[str]:
        return [f"{p}@{d}" for p in self.precisions for d in DENSITIES]

    def probe(self, q, k, v, out, block_mask, *, layer, inputs, step):
        reference = block_scores(q, k, implementation="jnp")
        probes = {}
        for precision in self.precisions:
            scores = block_scores(q, k, implementation="triton", precision=precision, interpret=self.interpret)
            probes.update({f"{precision}@{d}": v for d, v in agreement_by_density(scores, reference).items()})
        return probes

    def probe_template(self):
        return {key: jnp.zeros((), jnp.float32) for key in self.keys()}


def harness_agreement(
    precisions: Sequence[str], num_steps: int, num_samples: int, interpret: bool, clip: Sequence[int] | None = None
) -> dict:
    """Top-k agreement on the q, k of the shipped small video DiT (benchmarks/train_small.py):
    a dense ``num_steps``-step sampling run with guidance, every step and layer probed.

    ``clip`` = (frames, height, width) in pixels overrides the trained clip size (16, 64, 64)
    (the CPU smoke run uses a small one: XLA's dense attention there is quadratic in memory).
    Returns per ``"precision@density"`` the mean and the minimum over (step, layer), and the
    number of decisions behind them.
    """
    model, conditioner, config, _ = load_small_dit()
    if clip is not None:
        frames, height, width = clip
        config = dataclasses.replace(
            config, clip=dataclasses.replace(config.clip, frames=frames, height=height, width=width)
        )
    hooks = AgreementHooks(tuple(precisions), interpret)
    backend = AttentionBackend("dense", order="hilbert3d", hooks=hooks)
    sampler = Sampler(model, backend, shift=config.sample_shift, min_capacity=num_steps, progress=False)
    photo, motion = clip_classes(num_samples)
    noise = jax.random.normal(jax.random.key(0), (num_samples,) + config.latent_shape, jnp.float32)
    result = sampler(
        noise, conditioner(jnp.asarray(photo), jnp.asarray(motion)), conditioner.unconditional(num_samples),
        num_steps=num_steps, guidance_scale=config.guidance_scale, plan=None,
    )  # fmt: skip
    nk = -(-int(np.prod(config.token_grid)) // BLOCK)
    decisions = num_steps * config.wan.num_layers * 2 * num_samples * config.wan.num_heads * nk * nk
    out = {"grid": list(config.token_grid), "steps": num_steps, "decisions_per_density": decisions}
    for key in hooks.keys():
        values = np.asarray(result.probes[key], np.float64)
        out[key] = {"mean": float(values.mean()), "min": float(values.min())}
        print(f"[harness] {key}: mean {100 * values.mean():.4f}%, worst (step, layer) {100 * values.min():.4f}%", flush=True)
    return out


def run_shape(name: str, args, on_gpu: bool) -> tuple[list[dict], dict]:
    length, heads, head_dim, grid, agreement_heads = SHAPES[name]
    interpret = not on_gpu
    runner = Runner(name, warmup=args.warmup, repeats=args.repeats, target_s=args.target_s)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, heads, head_dim), jnp.bfloat16) for key in keys)
    print(f"[{name}] B=1 L={length} N={heads} D={head_dim}: scorer {resolve('scoring', q)}", flush=True)

    dense_impl = "cudnn" if on_gpu else "xla"
    runner.time(dense_impl, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=dense_impl), q, k, v)
    runner.time("jnp", functools.partial(block_scores, implementation="jnp"), q, k)
    for precision in args.precisions:
        runner.time(
            f"triton/{precision}",
            functools.partial(block_scores, implementation="triton", precision=precision, interpret=interpret),
            q, k, precision=precision,
        )

    num_tiles = -(-length // TILE)
    full = jnp.full((1,), num_tiles, jnp.int32)

    def with_tiling(tiling: ScoreTuning):
        def fn(q, k):
            return tile_block_scores(
                tile_means(q, TILE), tile_means(k, TILE), full, tiles_per_block=BLOCK // TILE,
                precision=DEFAULT_PRECISION, tuning=tiling, interpret=interpret,
            )

        return fn

    for tiling_name in args.tilings:
        runner.time(f"triton/{DEFAULT_PRECISION}/{tiling_name}", with_tiling(TILINGS[tiling_name]), q, k)
    qbar, kbar = jax.jit(lambda q, k: (tile_means(q, TILE), tile_means(k, TILE)))(q, k)
    runner.time(
        f"kernel only/{DEFAULT_PRECISION}",
        lambda qb, kb: tile_block_scores(qb, kb, full, tiles_per_block=BLOCK // TILE, interpret=interpret),
        qbar, kbar,
    )
    count = blocks_for_density(0.2, -(-length // BLOCK))
    runner.time(
        f"triton/{DEFAULT_PRECISION}+select(0.2)",
        lambda q, k: select_blocks(block_scores(q, k, implementation="triton", interpret=interpret), count),
        q, k,
    )
    runner.time("jnp+select(0.2)", lambda q, k: select_blocks(block_scores(q, k, implementation="jnp"), count), q, k)
    del q, k, v, qbar, kbar
    agree = {} if args.no_agreement else agreement(grid, agreement_heads, head_dim, args.precisions, interpret)
    return runner.records, agree


def table(records: list[dict], agreements: dict) -> list[str]:
    """One Markdown row per record, with its share of the shape's dense call and, for a whole
    scorer at one precision, that precision's agreement; a failed record says so in ``ms``."""
    rows = []
    for r in records:
        shape = r["shape"]
        if "ms" not in r:
            rows.append([shape, r["variant"], f"failed: {r['error'][:80]}", "", "", ""])
            continue
        dense = next((x.get("ms") for x in records if x["shape"] == shape and x["variant"] in ("cudnn", "xla")), None)
        share = f"{100 * r['ms'] / dense:.2f}%" if dense and r["variant"] not in ("cudnn", "xla") else ""
        temp = "" if r.get("temp_bytes") is None else f"{r['temp_bytes'] / 2**20:.0f}"
        agree = agreements.get(shape, {}).get(r.get("precision"), {})
        agree_text = " / ".join(f"{100 * agree[str(d)]:.3f}%" for d in DENSITIES) if str(DENSITIES[0]) in agree else ""
        rows.append([shape, r["variant"], f"{r['ms']:.4f}", share, temp, agree_text])
    return markdown_table(["shape", "variant", "ms", "share of dense", "temp MiB", "agreement 0.3 / 0.2 / 0.1"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.3b,14b", help=f"comma list of {tuple(SHAPES)}")
    parser.add_argument("--precisions", default="bf16,bf16x3,tf32", help=f"comma list of {PRECISIONS}")
    parser.add_argument("--tilings", default=",".join(TILINGS), help=f"comma list of {tuple(TILINGS)} ('' for none)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--target-s", type=float, default=0.1, help="seconds of back-to-back calls per repeat")
    parser.add_argument("--no-agreement", action="store_true", help="skip the top-k agreement stage")
    parser.add_argument("--harness-steps", type=int, default=10,
                        help="steps of the small-DiT agreement run (0: skip it)")  # fmt: skip
    parser.add_argument("--harness-samples", type=int, default=2, help="videos of the small-DiT agreement run")
    parser.add_argument("--harness-precisions", default=DEFAULT_PRECISION,
                        help="comma list of the precisions probed in the small-DiT run")  # fmt: skip
    parser.add_argument("--harness-clip", default=None,
                        help="FRAMES,HEIGHT,WIDTH (pixels) of the small-DiT run instead of the trained 16,64,64")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.tilings = [t for t in args.tilings.split(",") if t]
    args.harness_precisions = [p for p in args.harness_precisions.split(",") if p]
    for value, allowed, flag in ((args.shapes, SHAPES, "--shapes"), (args.precisions, PRECISIONS, "--precisions"),
                                 (args.tilings, TILINGS, "--tilings"),
                                 (args.harness_precisions, PRECISIONS, "--harness-precisions")):  # fmt: skip
        bad = [x for x in value if x not in allowed]
        if bad:
            parser.error(f"{flag}: unknown {bad}; choose from {tuple(allowed)}")

    on_gpu = jax.default_backend() == "gpu"
    print(f"jax {jax.__version__} on {device_name()}", flush=True)
    out = args.out or RESULTS_DIR / f"score_{device_slug()}.json"
    records, agreements, harness = [], {}, {}
    meta = run_record(__file__, argv)

    def save():  # after every stage: a run cut short by its time limit keeps what it measured
        write_json(out, {
            "device": device_name(), "jax": jax.__version__, "meta": meta, "tile_size": TILE, "block_size": BLOCK,
            "default_precision": DEFAULT_PRECISION, "records": records, "agreement": agreements,
            "harness_agreement": harness,
        })  # fmt: skip

    for shape in args.shapes:
        shape_records, agreements[shape] = run_shape(shape, args, on_gpu)
        records += shape_records
        save()
    if args.harness_steps > 0:
        try:
            clip = None if args.harness_clip is None else tuple(int(x) for x in args.harness_clip.split(","))
            harness = harness_agreement(
                args.harness_precisions, args.harness_steps, args.harness_samples, not on_gpu, clip
            )
        except Exception as err:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            harness = {"error": f"{type(err).__name__}: {err}"[:2000]}
    save()
    print(f"wrote {out}\n")
    print("\n".join(table(records, agreements)))
    if "decisions_per_density" in harness:
        print(f"\nsmall DiT q/k ({harness['steps']} steps, {harness['decisions_per_density']} decisions per density): "
              + ", ".join(f"{key} {100 * harness[key]['mean']:.3f}% (worst {100 * harness[key]['min']:.3f}%)"
                          for key in harness if "@" in key))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
