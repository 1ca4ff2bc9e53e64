"""Sample a real diffusers-format Wan2.1 checkpoint with DFSAttn: ``python -m models.generate``.

    python -m models.generate --checkpoint Wan2.1-T2V-1.3B-Diffusers \
        --prompt-embeds prompt.safetensors --frames 81 --height 480 --width 832 \
        --steps 50 --guidance 5.0 --shift 5.0 --solver unipc --backend dfs \
        --out out/latents.safetensors --mp4 out/video.mp4

Reads the transformer with :func:`models.wan.loading.load_wan`, the prompt embeddings (``cond``,
``uncond``) with :func:`models.io.load_prompt_embeds`, samples with
:class:`models.sampling.loop.Sampler` (one jitted loop, classifier-free guidance as one batch of 2),
writes the final latents with :func:`models.io.save_latents` and, with ``--mp4``, decodes them
with diffusers' VAE (:func:`models.io.decode_to_mp4`, optional extra).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfsattn_jax.schedule import DFSConfig
from models.common.processor import make_backend
from models.wan.config import latent_shape
from models.io import decode_to_mp4, load_latents, load_prompt_embeds, save_latents
from models.wan.loading import load_wan
from models.sampling import SOLVER_NAMES, Sampler

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="diffusers Wan2.1 folder (with transformer/, optionally vae/)")
    p.add_argument("--prompt-embeds", required=True, help="safetensors with 'cond' and 'uncond' [T, 4096] (UMT5 output)")
    p.add_argument("--out", default="out/latents.safetensors", help="where to write the final latents")
    p.add_argument("--mp4", default=None, help="also decode to this MP4 with diffusers' AutoencoderKLWan (optional extra)")
    p.add_argument("--vae", default=None, help="VAE folder (default: the checkpoint's vae/)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: no guidance)")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift (Wan: 5.0 for 720p, 3.0 for 480p)")
    p.add_argument("--solver", choices=SOLVER_NAMES, default="unipc")
    p.add_argument("--backend", choices=("dense", "dfs"), default="dfs")
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--density-decrement", type=float, default=0.1)
    p.add_argument("--dense-steps", type=int, default=12)
    p.add_argument("--refresh-interval", type=int, default=12)
    p.add_argument("--order", default="hilbert3d")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default=None, help="initial latents [1, 16, F, H, W] (safetensors 'latents') instead of --seed")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on GPU, f32 on CPU")
    return p


def _pad_text(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pads ``[1, T, E]`` to ``[1, length, E]`` (the Wan pipeline zero-pads prompts to 512)."""
    return np.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    model = load_wan(args.checkpoint, dtype=args.dtype, progress=lambda name: print(f"reading {name}", file=sys.stderr))
    cfg = model.config
    print(f"loaded {cfg.name} ({cfg.num_layers} layers, dim {cfg.dim}) in {time.perf_counter() - t0:.1f} s")
    guided = args.guidance > 1.0
    cond, uncond = load_prompt_embeds(args.prompt_embeds, text_dim=cfg.text_dim, require_uncond=guided)
    if guided:
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = _pad_text(cond, length), _pad_text(uncond, length)
    shape = (1,) + latent_shape(cfg, args.frames, args.height, args.width)
    if args.noise is not None:
        noise, _ = load_latents(args.noise)
        if noise.shape != shape:
            raise ValueError(f"--noise must have shape {list(shape)} for this size, got {list(noise.shape)}")
        noise = jnp.asarray(noise)
    else:
        noise = jax.random.normal(jax.random.key(args.seed), shape, jnp.float32)
    dfs = None
    if args.backend == "dfs":
        dfs = DFSConfig(
            density=args.density,
            density_decrement=args.density_decrement,
            dense_steps=args.dense_steps,
            refresh_interval=args.refresh_interval,
            order=args.order,
        )
    sampler = Sampler(model, make_backend(args.backend, dfs), solver=args.solver, shift=args.shift)
    t0 = time.perf_counter()
    result = sampler(
        noise, jnp.asarray(cond), jnp.asarray(uncond) if guided else None,
        num_steps=args.steps, guidance_scale=args.guidance,
    )
    elapsed = time.perf_counter() - t0
    meta = {
        "config": cfg.name, "frames": args.frames, "height": args.height, "width": args.width,
        "steps": args.steps, "guidance": args.guidance, "shift": args.shift, "solver": args.solver,
        "backend": args.backend, "seed": args.seed if args.noise is None else f"noise:{args.noise}",
        "sparsity": f"{result.sparsity:.4f}",
    }
    if dfs is not None:
        meta |= {"density": dfs.density, "density_decrement": dfs.density_decrement,
                 "dense_steps": dfs.dense_steps, "refresh_interval": dfs.refresh_interval, "order": dfs.order}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_latents(out, np.asarray(result.latents), meta)
    print(f"sampled {args.steps} steps in {elapsed:.1f} s (sparsity {result.sparsity:.2%}); latents -> {out}")
    if args.mp4:
        video = decode_to_mp4(np.asarray(result.latents), args.vae or args.checkpoint, args.mp4)
        print(f"video -> {video}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
