"""Sample a real diffusers-format Wan2.1 or HunyuanVideo checkpoint with DFSAttn: ``dfsattn-generate``.

    dfsattn-generate --checkpoint Wan2.1-T2V-1.3B-Diffusers \
        --prompt-embeds prompt.safetensors --frames 81 --height 480 --width 832 \
        --steps 50 --guidance 5.0 --solver unipc --backend dfs \
        --out out/latents.safetensors --mp4 out/video.mp4

    dfsattn-generate --model hunyuan-video --checkpoint HunyuanVideo \
        --prompt-embeds hunyuan_prompt.safetensors --out out/latents.safetensors --mp4 out/video.mp4

(``python -m models.generate`` is the same command.) ``--model`` picks the family and with it
the defaults (:data:`models.cli_args.MODEL_DEFAULTS`): Wan2.1 samples 81 frames of 480×832 with
UniPC and classifier-free guidance 5 (batch of 2); HunyuanVideo 129 frames of 720×1280 with the
flow-matching Euler schedule of its pipeline (shift 7), embedded guidance 6 (one batch, no CFG
pass) and the reference's DFS schedule with no always-dense layer. The arguments, the family
defaults and the option checks are :mod:`models.cli_args`.

Every option is checked before any weight is read: the choices, numbers and the DFS schedule
first, then the output paths and for ``--mp4`` the optional extra and the VAE folder, then the
files (the checkpoint's ``config.json``, which is cheap, the video size against its patch, the
prompt embeddings against its widths, ``--noise`` against the latent shape) and the devices.
Only then does it read the transformer (:func:`models.wan.loading.load_wan` or
:func:`models.hunyuan_video.loading.load_hunyuan_video`), print the DFS plan (with a WARNING
when DFS cannot sparsify anything), sample with :class:`models.sampling.loop.Sampler` (one
jitted loop; with ``--devices N`` on N devices split by ``--parallel``,
:mod:`models.common.parallel`), report the compile time and the per-step time separately, write
the final latents with :func:`models.io.save_latents` and, with ``--mp4``, decode them with
diffusers' VAE of the family (:func:`models.io.decode_to_mp4`).

A user error (a bad option, a missing or mismatched file) prints one line,
``dfsattn-generate: error: ...``, to stderr and exits with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfsattn_jax.joint import JointTokens
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule, reported_sparsity
from models.cli_args import (
    PROG,
    VIDEO_SUFFIXES,
    VAE_EXTRA_INSTALL,
    apply_model_defaults,
    build_parser,
    check_options,
    default_shift,
    dfs_config,
    option_error,
)
from models.common.files import check_writable, component_folder
from models.common.parallel import Parallelism, make_parallel
from models.common.processor import make_backend, num_token_blocks
from models.hunyuan_video import config as hunyuan_config
from models.hunyuan_video.loading import load_hunyuan_video, read_hunyuan_config
from models.hunyuan_video.transformer import HunyuanConditioning
from models.io import (
    decode_to_mp4,
    load_hunyuan_prompt_embeds,
    load_latents,
    load_prompt_embeds,
    save_latents,
)
from models.pipelines.wan_repository import read_boundary_ratio
from models.prompt_video import PromptEncoder, check_video_out, write_wan_video
from models.sampling import Sampler
from models.wan import config as wan_config
from models.wan.loading import load_wan, read_wan_config

__all__ = ["USER_ERRORS", "VAE_MODULES", "describe_plan", "main"]

#: The modules ``--mp4`` needs (the ``vae`` extra), checked before anything is read.
VAE_MODULES: tuple[str, ...] = ("torch", "diffusers", "imageio", "imageio_ffmpeg")
#: The library's argument names that the video size options set.
SIZE_OPTIONS = {"frames": "--frames", "height": "--height", "width": "--width"}


# --------------------------------------------------------------------------- checks


def _check_writable(path: str, option: str) -> pathlib.Path:
    """Checks that ``path`` can be written (missing folders would be created), naming the option;
    :func:`models.common.files.check_writable` does the check without leaving anything behind."""
    try:
        check_writable(path)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None
    return pathlib.Path(os.path.abspath(path))


def _check_vae_extra() -> None:
    """``--mp4`` needs torch, diffusers and imageio (with ffmpeg): checked without importing them."""
    missing = []
    for name in VAE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ValueError(
            f"--mp4 needs the optional VAE extra ({', '.join(missing)} not installed); "
            f"install it with: {VAE_EXTRA_INSTALL}"
        )


def _check_vae_folder(path: str) -> None:
    """``--mp4`` decodes with the VAE of ``--vae`` or of the checkpoint: its folder must hold one."""
    try:
        component_folder(path, "vae", "VAE")
    except ValueError as err:
        raise ValueError(f"--mp4: {err}; give the VAE folder with --vae") from None


def _latent_shape(cfg, args: argparse.Namespace, latent_shape) -> tuple[int, ...]:
    """The latent shape ``(1, C, F, H, W)`` of the video size (the family's ``latent_shape``
    checks it against the VAE and the model's patch; its errors name the options)."""
    try:
        return (1,) + latent_shape(cfg, args.frames, args.height, args.width)
    except ValueError as err:
        raise option_error(err, SIZE_OPTIONS, "--frames/--height/--width") from None


def _check_parallel(args: argparse.Namespace, cfg, guided: bool, num_tokens: int) -> Parallelism | None:
    """The device mesh of ``--devices``/``--parallel``, checked against the model (``cfg``: a Wan
    or HunyuanVideo config), the batch, the attended sequence (HunyuanVideo: video + text tokens)
    and the devices present (``None`` for one device)."""
    try:
        parallel = make_parallel(args.devices, args.parallel, guided=guided)
        if parallel is not None:
            parallel.check(batch=2 if guided else 1, num_heads=cfg.num_heads, num_tokens=num_tokens, guided=guided)
            parallel.mesh  # noqa: B018 - raises when too few devices exist
    except ValueError as err:
        context = f"--devices {args.devices} --parallel {args.parallel}"
        raise option_error(err, {"devices": "--devices"}, context) from None
    return parallel


def _pad_text(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pads ``[1, T, E]`` to ``[1, length, E]`` (the Wan pipeline zero-pads prompts to 512)."""
    return np.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))


# --------------------------------------------------------------------------- the DFS plan


def _steps_text(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    if len(steps) == 1:
        return str(steps[0])
    return f"{steps[0]}-{steps[-1]}"


def describe_plan(
    plan: SchedulePlan, dfs: DFSConfig, num_layers: int, num_tokens: int, joint: JointTokens | None = None
) -> tuple[list[str], str | None]:
    """Lines describing a DFS plan, and a warning when DFS cannot sparsify anything (else ``None``).

    With ``joint`` (HunyuanVideo's joint text + video attention) the tokens are counted as video
    + text and the expected sparsity as the reference counts it (docs/spec.md §6.1)."""
    nk = plan.num_key_blocks
    dense_layers = sorted(i for i in dfs.dense_layers if 0 <= i < num_layers)
    expected = reported_sparsity(plan, num_layers, dfs.dense_layers, joint=joint, block_size=dfs.block_size)
    dense = [s for s in range(plan.num_steps) if not plan.sparse[s]]
    refreshes = ", ".join(
        f"{s} (density {plan.density[s]:.2f}: {int(plan.num_blocks[s])} of {nk} blocks)" for s in plan.refresh_steps
    )
    tokens = f"{num_tokens} tokens" if joint is None else (
        f"{joint.video_len} video + {joint.text_len} text tokens (video reordered, text last, text query "
        f"blocks dense, text key blocks always on)"
    )
    lines = [
        f"DFS plan: {plan.num_steps} steps over {tokens} = {nk} key blocks of {dfs.block_size} "
        f"({dfs.order} order; dense layers {dense_layers or 'none'} of {num_layers})",
        f"  dense steps:   {_steps_text(dense)} ({len(dense)} of {plan.num_steps})",
        f"  refresh steps: {refreshes or 'none'}",
        f"  expected sparsity: {expected:.2%}",
    ]
    warning = None
    if expected <= 0.0:
        if nk < 2:
            why = (f"the video has {num_tokens} tokens, under two attention blocks of {dfs.block_size}; "
                   "use a larger size or --backend dense")
        elif not plan.sparse.any():
            why = f"--steps {plan.num_steps} <= --dense-steps {dfs.dense_steps}, so every step is dense"
        elif len(dense_layers) >= num_layers:
            why = f"every one of the {num_layers} layers is a dense layer"
        else:
            why = f"--density {dfs.density} keeps all {nk} key blocks"
        warning = f"WARNING: DFS cannot sparsify anything: {why}; this run is dense"
    return lines, warning


# --------------------------------------------------------------------------- main


def _load_noise(args: argparse.Namespace, shape: tuple[int, ...]) -> jax.Array:
    if args.noise is None:
        return jax.random.normal(jax.random.key(args.seed), shape, jnp.float32)
    noise, _ = load_latents(args.noise)
    if noise.shape != shape:
        raise ValueError(f"--noise must have shape {list(shape)} for this size, got {list(noise.shape)}")
    if not np.all(np.isfinite(noise)):
        raise ValueError(f"--noise {args.noise!r} holds non-finite values")
    return jnp.asarray(noise)


def _wan_inputs(args: argparse.Namespace):
    """Wan2.1: config, latent shape, the conditioning (text, negative text or None; with
    ``--prompt`` the :class:`PromptEncoder` that makes them once the weights may be read), token grid."""
    if read_boundary_ratio(args.checkpoint) is not None:  # not one transformer for every step: refuse
        raise ValueError(
            f"--checkpoint {args.checkpoint!r} is a Wan2.2 A14B repository (two experts, transformer_2/): "
            "dfsattn-generate runs one transformer; use models.WanPipeline (docs/wan.md)"
        )
    cfg = read_wan_config(args.checkpoint)
    shape = _latent_shape(cfg, args, wan_config.latent_shape)
    guided = args.guidance > 1.0
    if args.prompt is not None:
        encoder = PromptEncoder.check(args, cfg.text_dim, guided)
        return cfg, shape, encoder, None, wan_config.token_grid(cfg, shape[2:])
    cond, uncond = load_prompt_embeds(args.prompt_embeds, text_dim=cfg.text_dim, require_uncond=guided)
    if guided:
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = _pad_text(cond, length), _pad_text(uncond, length)
    negative = jnp.asarray(uncond) if guided else None
    return cfg, shape, jnp.asarray(cond), negative, wan_config.token_grid(cfg, shape[2:])


def _hunyuan_inputs(args: argparse.Namespace):
    """HunyuanVideo: config, latent shape, the conditioning (embedded guidance), token grid."""
    cfg = read_hunyuan_config(args.checkpoint)
    shape = _latent_shape(cfg, args, hunyuan_config.latent_shape)
    prompt = load_hunyuan_prompt_embeds(args.prompt_embeds, text_dim=cfg.text_dim, pooled_dim=cfg.pooled_dim)
    cond = HunyuanConditioning(
        jnp.asarray(prompt.prompt_embeds[None]), jnp.asarray(prompt.prompt_attention_mask[None]),
        jnp.asarray(prompt.pooled_prompt_embeds[None]), jnp.full((1,), args.guidance, jnp.float32),
    )  # fmt: skip
    return cfg, shape, cond, None, hunyuan_config.token_grid(cfg, shape[2:])


def _load_model(args: argparse.Namespace):
    progress = lambda name: print(f"reading {name}", file=sys.stderr)  # noqa: E731
    if args.model == "hunyuan-video":
        return load_hunyuan_video(args.checkpoint, dtype=args.dtype, progress=progress)
    return load_wan(args.checkpoint, dtype=args.dtype, progress=progress)


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    # 1. Options that need no file.
    family = apply_model_defaults(args)
    check_options(args)
    dfs = dfs_config(args, family)  # built with either backend: it validates the schedule options
    dfs = dfs if args.backend == "dfs" else None
    # 2. Outputs and the optional extra: fail now, not after sampling.
    out = _check_writable(args.out, "--out")
    if out.suffix.lower() in VIDEO_SUFFIXES:
        check_video_out(args.checkpoint, out)
    if args.mp4 is not None:
        _check_vae_extra()
        mp4 = _check_writable(args.mp4, "--mp4")
        if mp4 == out:
            raise ValueError(f"--mp4 and --out are the same file {args.out!r}")
        _check_vae_folder(args.vae or args.checkpoint)
    # 3. Cheap files, against the model's config.json (no weight is read).
    hunyuan = args.model == "hunyuan-video"
    cfg, shape, cond, negative, grid = (_hunyuan_inputs if hunyuan else _wan_inputs)(args)
    noise = _load_noise(args, shape)
    if args.shift is not None:
        shift, how = args.shift, "given"
    elif family.shift is not None:
        shift, how = family.shift, f"default for {args.model}"
    else:
        shift, how = default_shift(args.height), f"default for height {args.height}: 3.0 below 720, 5.0 from 720"
    print(f"flow shift {float(shift)} ({how})")
    joint = JointTokens(math.prod(grid), cond.prompt_embeds.shape[1]) if hunyuan else None
    num_tokens = math.prod(grid) if joint is None else joint.length
    parallel = _check_parallel(args, cfg, negative is not None, num_tokens)
    if parallel is not None:
        print(f"devices: {parallel.size} x {parallel.mesh.devices.flat[0].device_kind}, {parallel.guidance} (guidance) "
              f"x {parallel.heads} (heads)")
    if dfs is not None:
        plan = plan_schedule(dfs, args.steps, num_token_blocks(num_tokens, dfs.block_size))
        lines, warning = describe_plan(plan, dfs, cfg.num_layers, num_tokens, joint)
        print("\n".join(lines))
        if warning:
            print(f"{PROG}: {warning}", file=sys.stderr)
    else:
        print(f"attention: dense over {num_tokens} tokens (no DFS)")
    sys.stdout.flush()

    # 4. The weights, then sampling.
    if isinstance(cond, PromptEncoder):
        cond, negative = cond.encode()
    t0 = time.perf_counter()
    model = _load_model(args)
    print(f"loaded {cfg.name} ({cfg.num_layers} layers, dim {cfg.dim}) in {time.perf_counter() - t0:.1f} s")
    sampler = Sampler(
        model, make_backend(args.backend, dfs), solver=args.solver, shift=shift, schedule=family.schedule,
        progress=True, parallel=parallel,
    )  # fmt: skip
    result = sampler(noise, cond, negative, num_steps=args.steps, guidance_scale=args.guidance)
    compiled = result.compile_s
    compile_text = "compile time not measured" if math.isnan(compiled) else f"compiled in {compiled:.1f} s"
    print(
        f"{compile_text}; sampled {args.steps} steps in {result.time_s:.2f} s "
        f"({result.time_s / args.steps:.3f} s/step); measured sparsity {result.sparsity:.2%}"
    )
    meta = {
        "model": args.model, "config": cfg.name, "frames": args.frames, "height": args.height, "width": args.width,
        "steps": args.steps, "guidance": args.guidance, "shift": shift, "solver": args.solver,
        "backend": args.backend, "seed": args.seed if args.noise is None else f"noise:{args.noise}",
        "sparsity": f"{result.sparsity:.4f}", "devices": "1" if parallel is None else str(parallel),
    }  # fmt: skip
    if dfs is not None:
        meta |= {"density": dfs.density, "density_decrement": dfs.density_decrement,
                 "dense_steps": dfs.dense_steps, "refresh_interval": dfs.refresh_interval, "order": dfs.order,
                 "dense_layers": ",".join(map(str, dfs.dense_layers)), "schedule": args.schedule or "options"}
    if out.suffix.lower() in VIDEO_SUFFIXES:
        written = write_wan_video(np.asarray(result.latents), args.checkpoint, out, dtype=args.dtype)
        print(f"video -> {written}")
        return 0
    save_latents(out, np.asarray(result.latents), meta)
    print(f"latents -> {args.out}")
    if args.mp4:
        video = decode_to_mp4(np.asarray(result.latents), args.vae or args.checkpoint, args.mp4, model=args.model)
        print(f"video -> {video}")
    return 0


#: What counts as a user error: one line and exit 2 (``--debug``: the traceback).
USER_ERRORS = (ValueError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0, or 2 after a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except USER_ERRORS as err:
        if "--debug" in argv:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
