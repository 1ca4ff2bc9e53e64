"""Prompt to video, piece by piece: JAX against diffusers / transformers (PyTorch) on one card.

The GPU table of the prompt-to-video pipeline (docs/wan.md): bf16, random weights at full size,
each stage in its own process (so that each peak memory is its own) with a time limit:

* ``umt5:jax`` / ``umt5:torch``: a UMT5-XXL encode of 2 × 512 tokens (one prompt of 512 valid
  tokens, one of 128: WanPipeline pads every prompt to 512) with our
  :class:`~models.text_encoders.umt5.UMT5EncoderModel` / transformers' ``UMT5EncoderModel``;
* ``vae:FRAMEWORK:SIZE:TILING`` (``SIZE`` ``480p`` = 480×832 or ``720p`` = 720×1280, ``TILING``
  ``tiled`` or ``untiled``): a Wan2.1 VAE decode of 81 frames (21 latent frames) with our
  :class:`~models.vae.WanVAE` / diffusers' ``AutoencoderKLWan`` (``enable_tiling()`` when tiled):
  the first call (JAX: compile + run) and the median of the timed calls, and the peak memory;
* ``e2e:CONFIG:SIZE:STEPS``: prompt → MP4 with :class:`~models.pipelines.wan.WanPipeline` built
  from random parts (UMT5-XXL, the Wan2.1 transformer ``CONFIG``, the VAE; DFSAttn with the
  default ``wan2.1`` schedule; the tiny test tokenizer, whose ids cost UMT5 what real ones do),
  81 frames, split into text, compile, steps, decode and write. Text and decode are timed warm
  (a second call) and cold; ``wall_s`` is the warm sum, the figure the issue's target compares
  with the steps alone. Reading a checkpoint from disk is not in it.

Run from the repository root (PyTorch stages need torch, transformers and diffusers)::

    python -m benchmarks.prompt_video_bench --stages umt5:jax,umt5:torch,vae:jax:480p:untiled \\
        --out-dir benchmarks/results

Smoke test on CPU (tiny shapes, JAX stages only)::

    JAX_PLATFORMS=cpu python -m benchmarks.prompt_video_bench --smoke --stages umt5:jax,vae:jax:480p:tiled,e2e:tiny:480p:2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import RESULTS_DIR, module_command, run_record, write_markdown

SIZES = {"480p": (480, 832), "720p": (720, 1280)}
SMOKE_SIZES = {"480p": (32, 48), "720p": (48, 64)}
FRAMES = 81
SMOKE_FRAMES = 5
TEXT_LENGTH = 512
VALID_TOKENS = (512, 128)
PROMPT = "A cat walks on the grass, realistic"
SHIFT = {"480p": 3.0, "720p": 5.0}  # Wan2.1's flow shift by size (diffusers' examples)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="umt5:jax,umt5:torch", help="comma-separated stages (module docstring)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per stage")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--smoke", action="store_true", help="tiny configs and sizes (CPU smoke test)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON and markdown go")
    p.add_argument("--video-dir", default=None, help="where e2e writes its MP4 (default: a temporary folder)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- the stages


def _jax_dtype(args):
    """bf16, as the table is measured; float32 for the CPU smoke test (some CPU backends have no
    bf16 dot)."""
    import jax.numpy as jnp

    return jnp.float32 if args.smoke else jnp.bfloat16


def _tokens(vocab: int, smoke: bool):
    import numpy as np

    length = 16 if smoke else TEXT_LENGTH
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2, length), dtype=np.int32)
    mask = np.zeros((2, length), np.int32)
    for row, valid in enumerate(VALID_TOKENS):
        valid = min(valid, length // (row + 1))
        mask[row, :valid] = 1
        ids[row, valid:] = 0
    return ids, mask


def stage_umt5_jax(args) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.harness import first_call, median_time, peak_memory_bytes
    from models.pipelines.wan import _encode
    from models.text_encoders.umt5 import UMT5EncoderModel, get_config

    cfg = get_config("tiny" if args.smoke else "umt5-xxl")
    dtype = _jax_dtype(args)
    model = UMT5EncoderModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    ids, mask = (jnp.asarray(a) for a in _tokens(cfg.vocab_size, args.smoke))
    out, first_s = first_call(_encode, model, ids, mask)
    timing = median_time(_encode, model, ids, mask, warmup=2, repeats=max(args.repeats, 5))
    return {"first_s": first_s, "median_s": timing.median_s, "times_s": list(timing.times_s),
            "peak_bytes": peak_memory_bytes(), "finite": bool(jnp.isfinite(out.astype(jnp.float32)).all())}  # fmt: skip


def _torch_timing(fn, warmup: int, repeats: int) -> dict:
    """``{"first_s", "median_s", "times_s"}`` of a PyTorch CUDA call, with the harness's timer:
    the call synchronizes the device itself (``jax.block_until_ready`` passes a torch tensor
    through), as kernel_bench's FlexAttention call does."""
    import torch

    from benchmarks.harness import first_call, median_time

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    _, first_s = first_call(synced)
    timing = median_time(synced, warmup=warmup, repeats=repeats)
    return {"first_s": first_s, "median_s": timing.median_s, "times_s": list(timing.times_s)}


def stage_umt5_torch(args) -> dict:
    import torch
    import transformers

    from models.text_encoders.umt5 import get_config

    ours = get_config("umt5-xxl")
    config = transformers.UMT5Config(
        vocab_size=ours.vocab_size, d_model=ours.d_model, d_kv=ours.d_kv, num_heads=ours.num_heads,
        d_ff=ours.d_ff, num_layers=ours.num_layers, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=ours.relative_attention_num_buckets,
        relative_attention_max_distance=ours.relative_attention_max_distance, dropout_rate=0.0,
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.UMT5EncoderModel(config).eval()
    ids, mask = (torch.as_tensor(a, device="cuda").long() for a in _tokens(config.vocab_size, False))
    torch.cuda.reset_peak_memory_stats()

    def call():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    timing = _torch_timing(call, warmup=2, repeats=max(args.repeats, 5))
    return {**timing, "peak_bytes": torch.cuda.max_memory_allocated(),
            "attn_implementation": str(model.config._attn_implementation), "torch": torch.__version__,
            "transformers": transformers.__version__}  # fmt: skip


def _latents_shape(size: str, smoke: bool) -> tuple[int, ...]:
    h, w = (SMOKE_SIZES if smoke else SIZES)[size]
    frames = SMOKE_FRAMES if smoke else FRAMES
    return (1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)


def stage_vae_jax(args, size: str, tiling: str) -> dict:
    import jax
    from flax import nnx

    from benchmarks.harness import first_call, median_time, peak_memory_bytes
    from models.vae import WanVAE, WanVAETiling, decode_video

    config = "tiny" if args.smoke else "wan2.1"
    dtype = _jax_dtype(args)
    vae = WanVAE(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    tiles = (WanVAETiling(16, 16, 8, 8) if args.smoke else WanVAETiling()) if tiling == "tiled" else None
    z = jax.random.normal(jax.random.key(0), _latents_shape(size, args.smoke), dtype)

    def call(z):
        return decode_video(vae, z, tiles)

    out, first_s = first_call(call, z)
    timing = median_time(call, z, warmup=0, repeats=args.repeats)
    return {"first_s": first_s, "median_s": timing.median_s, "times_s": list(timing.times_s),
            "peak_bytes": peak_memory_bytes(), "shape": list(out.shape)}  # fmt: skip


def stage_vae_torch(args, size: str, tiling: str) -> dict:
    import diffusers
    import torch

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        vae = diffusers.AutoencoderKLWan().eval()  # the default config is Wan2.1's VAE
    if tiling == "tiled":
        vae.enable_tiling()
    z = torch.randn(_latents_shape(size, False), device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()

    def call():
        with torch.inference_mode():
            return vae.decode(z).sample

    timing = _torch_timing(call, warmup=0, repeats=args.repeats)
    return {**timing, "peak_bytes": torch.cuda.max_memory_allocated(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}  # fmt: skip


def stage_e2e(args, config_name: str, size: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.harness import peak_memory_bytes
    from dfsattn_jax.schedule import get_schedule_preset
    from models.common.backend import make_backend
    from models.common.video import mp4_encoder, to_uint8_frames, write_gif, write_mp4
    from models.pipelines.wan import WanPipeline
    from models.prompt_video import VIDEO_FPS
    from models.sampling import Sampler
    from models.text_encoders.prompts import PromptTokenizer
    from models.text_encoders.umt5 import UMT5EncoderModel
    from models.vae import WanVAE, WanVAETiling
    from models.wan.transformer import WanTransformer3DModel

    dtype = _jax_dtype(args)
    root = pathlib.Path(__file__).resolve().parents[1]
    t0 = time.perf_counter()
    tiny = config_name == "tiny"
    transformer = WanTransformer3DModel(config_name, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    text_encoder = UMT5EncoderModel("tiny" if tiny else "umt5-xxl", rngs=nnx.Rngs(1), dtype=dtype, param_dtype=dtype)
    if tiny:  # the tiny transformer reads 16 text tokens of width 32
        text_encoder = UMT5EncoderModel(
            text_encoder.config.replace(d_model=transformer.config.text_dim), rngs=nnx.Rngs(1), dtype=dtype,
            param_dtype=dtype,
        )  # fmt: skip
    vae = WanVAE("tiny" if tiny else "wan2.1", dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(2))
    tokenizer = PromptTokenizer.from_pretrained(root / "tests" / "fixtures" / "t5_tokenizer_tiny")
    schedule = get_schedule_preset("wan2.1")
    sampler = Sampler(transformer, make_backend("dfs", schedule), solver="unipc", shift=SHIFT[size], schedule="unipc")
    tiling = None if size == "480p" else (WanVAETiling(16, 16, 8, 8) if args.smoke else WanVAETiling())
    # 14B beside a resident UMT5-XXL does not fit an 80 GB card: the pipeline lets it go after
    # encoding, as it does by default on GPUs (here after the text timings, which keep it).
    keep = not config_name.endswith("14b")
    pipe = WanPipeline(transformer=transformer, tokenizer=tokenizer, vae=vae, sampler=sampler,
                       text_encoder=text_encoder, keep_text_encoder=keep, dtype=dtype, vae_tiling=tiling)  # fmt: skip
    del text_encoder
    jax.block_until_ready(nnx.state(pipe.transformer))
    init_s = time.perf_counter() - t0
    h, w = (SMOKE_SIZES if args.smoke else SIZES)[size]
    frames = SMOKE_FRAMES if args.smoke else FRAMES
    length = transformer.config.text_len

    def text():
        start = time.perf_counter()
        jax.block_until_ready(pipe.encode_prompt([PROMPT, ""], length))
        return time.perf_counter() - start

    text_cold, text_warm = text(), text()
    out = pipe(PROMPT, height=h, width=w, num_frames=frames, num_inference_steps=steps, output_type="latent",
               max_sequence_length=length, seed=0)  # fmt: skip
    latents = jnp.asarray(out.frames)

    def decode():
        start = time.perf_counter()
        video = pipe.decode(latents)
        return video, time.perf_counter() - start

    _, decode_cold = decode()
    video, decode_warm = decode()
    folder = pathlib.Path(args.video_dir or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images = to_uint8_frames(video[0])
    encoder = mp4_encoder()
    if encoder is None:
        path = write_gif(images, folder / f"{config_name}_{size}.gif", frame_ms=round(1000 / VIDEO_FPS))
    else:
        path = write_mp4(images, folder / f"{config_name}_{size}.mp4", fps=VIDEO_FPS, encoder=encoder)
    write_s = time.perf_counter() - start
    timings = out.timings
    wall = text_warm + timings["sampling"] + decode_warm + write_s
    return {
        "init_s": init_s, "text_cold_s": text_cold, "text_s": text_warm, "pipeline_text_s": timings["text"],
        "compile_s": timings["compile"], "steps": steps, "steps_s": timings["sampling"],
        "per_step_s": timings["sampling"] / steps, "decode_cold_s": decode_cold, "decode_s": decode_warm,
        "write_s": write_s, "writer": encoder or "gif", "file_bytes": os.path.getsize(path),
        "wall_s": wall, "wall_over_steps": wall / timings["sampling"], "sparsity": out.sparsity,
        "frames_shape": list(video.shape), "peak_bytes": peak_memory_bytes(),
    }  # fmt: skip


def run_stage(args, spec: str) -> dict:
    """Runs one stage in this process (the child of :func:`main`)."""
    result = _run(args, spec)
    result["device"] = _device(spec)
    return result


def _device(spec: str) -> str:
    if ":torch" in spec:
        import torch

        return torch.cuda.get_device_name()
    from models.evaluation.results import device_name

    return device_name()


def _run(args, spec: str) -> dict:
    kind, *rest = spec.split(":")
    if kind == "umt5" and rest in (["jax"], ["torch"]):
        return stage_umt5_jax(args) if rest[0] == "jax" else stage_umt5_torch(args)
    if kind == "vae" and len(rest) == 3 and rest[1] in SIZES and rest[2] in ("tiled", "untiled"):
        if rest[0] == "jax":
            return stage_vae_jax(args, rest[1], rest[2])
        if rest[0] == "torch":
            return stage_vae_torch(args, rest[1], rest[2])
    if kind == "e2e" and len(rest) == 3 and rest[1] in SIZES and rest[2].isdigit():
        return stage_e2e(args, rest[0], rest[1], int(rest[2]))
    raise ValueError(f"unknown stage {spec!r} (see the module docstring)")


# ---------------------------------------------------------------------------------- the driver


def _child(args, spec: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "stage.json"
        argv = ["--stage", spec, "--stage-out", str(out), "--repeats", str(args.repeats)]
        argv += ["--smoke"] if args.smoke else []
        argv += ["--video-dir", args.video_dir] if args.video_dir else []
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        start = time.perf_counter()
        try:
            proc = subprocess.run(module_command(__file__, argv), env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {args.timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"status": f"failed (exit {proc.returncode})"}
        result = json.loads(out.read_text())
        result["status"] = "ok"
        result["process_s"] = time.perf_counter() - start
        return result


def _fmt(value, scale=1.0, digits=2) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def report(results: dict) -> list[str]:
    lines = [f"# Prompt to video, piece by piece ({results['run']['device']})", "",
             "| stage | status | first call (s) | median (s) | peak memory (GiB) |", "|---|---|---|---|---|"]  # fmt: skip
    e2e = []
    for spec, r in results["stages"].items():
        if spec.startswith("e2e"):
            e2e.append((spec, r))
            continue
        lines.append(f"| {spec} | {r['status']} | {_fmt(r.get('first_s'))} | {_fmt(r.get('median_s'), 1, 3)} "
                     f"| {_fmt(r.get('peak_bytes'), 2**-30)} |")  # fmt: skip
    if e2e:
        lines += ["", "| run | status | text (s) | compile (s) | steps (s) | decode (s) | write (s) | wall / steps "
                  "| peak (GiB) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for spec, r in e2e:
            lines.append(
                f"| {spec} | {r['status']} | {_fmt(r.get('text_s'))} | {_fmt(r.get('compile_s'), 1, 1)} "
                f"| {_fmt(r.get('steps_s'))} | {_fmt(r.get('decode_s'))} | {_fmt(r.get('write_s'))} "
                f"| {_fmt(r.get('wall_over_steps'), 1, 3)} | {_fmt(r.get('peak_bytes'), 2**-30)} |"
            )
    return lines


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.stage is not None:
        result = run_stage(args, args.stage)
        pathlib.Path(args.stage_out).write_text(json.dumps(result))
        return None
    specs = [s for s in args.stages.split(",") if s]
    results = {"run": run_record(__file__, argv, device="(starting)"), "stages": {}}
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "prompt_video_smoke" if args.smoke else "prompt_video"
    for spec in specs:
        print(f"== {spec}", flush=True)
        results["stages"][spec] = r = _child(args, spec)
        # The driver starts no backend (it would hold device memory): the stages name the device.
        results["run"]["device"] = r.get("device", results["run"]["device"])
        print(f"== {spec}: {json.dumps(r)}", flush=True)
        (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
        write_markdown(out_dir / f"{name}.md", report(results))
    print("\n".join(report(results)))
    return results


if __name__ == "__main__":
    sys.exit(main() is None and 0)
