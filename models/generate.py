"""Sample a real diffusers-format Wan2.1 or HunyuanVideo checkpoint with DFSAttn: ``dfsattn-generate``.

    dfsattn-generate --checkpoint Wan2.1-T2V-1.3B-Diffusers \
        --prompt-embeds prompt.safetensors --frames 81 --height 480 --width 832 \
        --steps 50 --guidance 5.0 --solver unipc --backend dfs \
        --out out/latents.safetensors --mp4 out/video.mp4

    dfsattn-generate --model hunyuan-video --checkpoint HunyuanVideo \
        --prompt-embeds hunyuan_prompt.safetensors --out out/latents.safetensors --mp4 out/video.mp4

(``python -m models.generate`` is the same command.) ``--model`` picks the family and with it
the defaults (:data:`MODEL_DEFAULTS`): Wan2.1 samples 81 frames of 480×832 with UniPC and
classifier-free guidance 5 (batch of 2); HunyuanVideo 129 frames of 720×1280 with the
flow-matching Euler schedule of its pipeline (shift 7), embedded guidance 6 (one batch, no CFG
pass) and the reference's DFS schedule with no always-dense layer. Every option is checked before
any weight is read: the sizes, choices and numbers first, then the files (the checkpoint's
``config.json``, which is cheap, the prompt embeddings against its widths, ``--noise`` against the
latent shape, the output paths, and for ``--mp4`` the optional extra and the VAE folder). Only
then does it read the transformer (:func:`models.wan.loading.load_wan` or
:func:`models.hunyuan_video.loading.load_hunyuan_video`), print the DFS plan (with a WARNING
when DFS cannot sparsify anything), sample with :class:`models.sampling.loop.Sampler` (one
jitted loop; with ``--devices N`` on N devices split by ``--parallel``,
:mod:`models.common.parallel`), report the compile time and the per-step time separately, write the final latents
with :func:`models.io.save_latents` and, with ``--mp4``, decode them with diffusers' VAE of the
family (:func:`models.io.decode_to_mp4`).

A user error (a bad option, a missing or mismatched file) prints one line,
``dfsattn-generate: error: ...``, to stderr and exits with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import SCHEDULE_PRESETS, DFSConfig, SchedulePlan, get_schedule_preset, plan_schedule, reported_sparsity
from models.common.parallel import PARALLEL_MODES, Parallelism, make_parallel
from models.common.processor import make_backend, num_token_blocks
from models.hunyuan_video import config as hunyuan_config
from models.hunyuan_video.loading import load_hunyuan_video, read_hunyuan_config
from models.hunyuan_video.transformer import HunyuanConditioning
from models.io import (
    check_writable,
    decode_to_mp4,
    load_hunyuan_prompt_embeds,
    load_latents,
    load_prompt_embeds,
    save_latents,
    VAE_RECIPES,
)
from models.sampling import SOLVER_NAMES, Sampler
from models.wan import config as wan_config
from models.wan.config import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR
from models.wan.loading import load_wan, read_wan_config

__all__ = ["MODEL_DEFAULTS", "MODEL_NAMES", "PROG", "ModelDefaults", "build_parser", "default_shift", "main"]

PROG = "dfsattn-generate"
#: The modules ``--mp4`` needs (the ``vae`` extra), checked before anything is read.
VAE_MODULES: tuple[str, ...] = ("torch", "diffusers", "imageio", "imageio_ffmpeg")
VAE_EXTRA_INSTALL = 'pip install -e ".[vae]"'
#: Height from which Wan's flow shift is the 720p value.
SHIFT_720P_HEIGHT = 720
_HELP_WIDTH = 100  # fixed, so that --help reads the same everywhere (and in the README)


class _UsageError(ValueError):
    """A command-line parse error (argparse would print the usage and exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, handled by main() like every user error
        raise _UsageError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fixed width; appends ``(default: X)`` unless the help already states a default."""

    def __init__(self, prog: str):
        super().__init__(prog, width=_HELP_WIDTH, max_help_position=30)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if "default" in text or "required" in text or unset:
            return text
        return f"{text} (default: %(default)s)"


def default_shift(height: int) -> float:
    """Wan's flow shift for a resolution: 3.0 below 720p, 5.0 at 720p and above."""
    return 5.0 if height >= SHIFT_720P_HEIGHT else 3.0


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """What ``--model`` sets: the defaults of the options left out, and how the family samples.

    Attributes:
      frames, height, width: the video size.
      guidance: ``--guidance``: classifier-free (Wan) or embedded (HunyuanVideo).
      solver: ``--solver``; ``solvers``: the ones the family's schedule allows.
      shift: the flow shift (``None``: from the height, Wan's rule).
      schedule: the sigma rule (:data:`models.sampling.schedule.SCHEDULE_NAMES`).
      dfs_preset: the family's schedule preset (:data:`dfsattn_jax.schedule.SCHEDULE_PRESETS`): its
        always-dense layers, with the schedule options (whose defaults are its values), unless
        ``--schedule`` names another preset.

    The VAE that ``--mp4`` decodes with is the family's :data:`models.io.VAE_RECIPES` entry.
    """

    frames: int
    height: int
    width: int
    guidance: float
    solver: str
    solvers: tuple[str, ...]
    shift: float | None
    schedule: str
    dfs_preset: str


#: The families ``--model`` knows, with their pipelines' defaults.
MODEL_DEFAULTS: dict[str, ModelDefaults] = {
    "wan2.1": ModelDefaults(81, 480, 832, 5.0, "unipc", SOLVER_NAMES, None, "unipc", "wan2.1"),
    "hunyuan-video": ModelDefaults(129, 720, 1280, 6.0, "euler", ("euler",), 7.0, "flow-match-euler",
                                   "hunyuan-video"),
}  # fmt: skip
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_DEFAULTS)


def _per_model(field: str) -> str:
    """``"81 for wan2.1, 129 for hunyuan-video"``: a default that depends on ``--model``."""
    return ", ".join(f"{getattr(d, field)} for {name}" for name, d in MODEL_DEFAULTS.items())


def build_parser() -> argparse.ArgumentParser:
    """The ``dfsattn-generate`` argument parser (abbreviations off, defaults and choices shown)."""
    p = _Parser(
        prog=PROG,
        usage="%(prog)s --checkpoint DIR --prompt-embeds FILE [options]",
        description="Sample a diffusers-format Wan2.1 or HunyuanVideo checkpoint with DFSAttn block-sparse attention.",
        epilog=(
            "Also runs as `python -m models.generate`. Options are checked before any weight is read;\n"
            "a user error prints one line and exits 2 (--debug: the traceback)."
        ),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", choices=MODEL_NAMES, default="wan2.1",
                    help="model family; it sets the values marked 'for wan2.1, ... for hunyuan-video' below")
    io.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="diffusers folder of that model (with transformer/, optionally vae/) (required)")
    io.add_argument("--prompt-embeds", required=True, metavar="FILE",
                    help="wan2.1: safetensors with 'cond' and 'uncond' [T, text_dim] (UMT5 output; 'uncond' "
                         "only with guidance); hunyuan-video: .safetensors or .npz with 'prompt_embeds' "
                         "[T, 4096], 'prompt_attention_mask' [T], 'pooled_prompt_embeds' [768] (required)")
    io.add_argument("--out", default="out/latents.safetensors", metavar="FILE",
                    help="where to write the final latents")
    io.add_argument("--mp4", default=None, metavar="FILE",
                    help=f"also decode to this MP4 with diffusers' VAE ({', '.join(f'{VAE_RECIPES[m].vae_class} for {m}' for m in MODEL_NAMES)}); needs the "
                         f"optional extra: {VAE_EXTRA_INSTALL} (default: none)")
    io.add_argument("--vae", default=None, metavar="DIR",
                    help="VAE folder for --mp4 (default: the checkpoint's vae/)")

    size = p.add_argument_group("video size")
    size.add_argument("--frames", type=int, metavar="N", default=None,
                      help=f"video frames, 4*k + 1 (default: {_per_model('frames')})")
    for name in ("height", "width"):
        size.add_argument(f"--{name}", type=int, metavar="PX", default=None,
                          help=f"pixels, a multiple of 16 (VAE 8x, patch 2) (default: {_per_model(name)})")

    samp = p.add_argument_group("sampling")
    samp.add_argument("--steps", type=int, metavar="N", default=50, help="denoising steps, >= 1")
    samp.add_argument("--guidance", type=float, metavar="SCALE", default=None,
                      help="guidance scale, finite: wan2.1 classifier-free (<= 1: no guidance), hunyuan-video "
                           f"embedded (one batch) (default: {_per_model('guidance')})")
    samp.add_argument("--shift", type=float, metavar="SHIFT", default=None,
                      help="flow shift, > 0 (default: wan2.1 from --height, 3.0 below 720, 5.0 from 720; "
                           "hunyuan-video 7.0)")
    samp.add_argument("--solver", choices=SOLVER_NAMES, default=None,
                      help=f"flow-matching solver (default: {_per_model('solver')}; hunyuan-video: euler only)")
    samp.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the initial noise, in [0, 2**32)")
    samp.add_argument("--noise", default=None, metavar="FILE",
                      help="initial latents [1, 16, F, H, W] (safetensors 'latents') (default: none, "
                           "noise from --seed)")
    samp.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                      help="model dtype (default: bfloat16 on GPU, float32 on CPU)")

    dfs = p.add_argument_group(
        "attention (DFSAttn)", "always-dense layers come with --model's preset: layer 0 for wan2.1, none for "
        "hunyuan-video (or with --schedule NAME)"
    )
    dfs.add_argument("--backend", choices=("dense", "dfs"), default="dfs", help="self-attention backend")
    dfs.add_argument("--density", type=float, metavar="D", default=0.3,
                     help="kept fraction of key blocks at the first refresh, in (0, 1]")
    dfs.add_argument("--density-decrement", type=float, metavar="D", default=0.1,
                     help="density dropped at each later refresh, in [0, 1] (0: refresh forever)")
    dfs.add_argument("--dense-steps", type=int, metavar="N", default=12, help="leading steps that run dense, >= 0")
    dfs.add_argument("--refresh-interval", type=int, metavar="N", default=12, help="steps between mask refreshes, >= 1")
    dfs.add_argument("--order", choices=ORDER_NAMES, default="hilbert3d", help="token order of the blocks")
    dfs.add_argument("--schedule", choices=sorted(SCHEDULE_PRESETS), default=None,
                     help="a named schedule (dfsattn_jax.schedule.SCHEDULE_PRESETS: schedule and dense layers) "
                          "instead of --density, --density-decrement, --dense-steps and --refresh-interval, "
                          "which then keep their defaults (default: none: the --model's preset, of the same "
                          "name, with those options)")

    dev = p.add_argument_group("devices")
    dev.add_argument("--devices", type=int, metavar="N", default=1,
                     help="GPUs (JAX devices) to sample on, >= 1; the weights are replicated on each")
    dev.add_argument("--parallel", choices=PARALLEL_MODES, default="auto",
                     help="how --devices splits the work: guidance = cond and uncond on different devices (N=2), "
                          "heads = attention heads and tokens (Ulysses), both = 2 x N/2; auto = both for an "
                          "even N with guidance, else heads")

    misc = p.add_argument_group("other")
    misc.add_argument("--debug", action="store_true", help="show the traceback of an error (default: off)")
    return p


# --------------------------------------------------------------------------- checks


def _apply_model_defaults(args: argparse.Namespace) -> ModelDefaults:
    """Fills the options left out with the ``--model`` family's defaults; returns them."""
    defaults = MODEL_DEFAULTS[args.model]
    for name in ("frames", "height", "width", "guidance", "solver"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    if args.solver not in defaults.solvers:
        raise ValueError(
            f"--solver must be one of {defaults.solvers} for --model {args.model} (its pipeline's "
            f"{defaults.schedule} schedule), got {args.solver!r}"
        )
    return defaults


def _check_options(args: argparse.Namespace) -> None:
    """Checks every number and size that needs no file (raises ValueError naming the option)."""
    if args.frames < 1 or (args.frames - 1) % VAE_TEMPORAL_FACTOR:
        raise ValueError(f"--frames must be 4*k + 1 (1, 5, ..., 81), got {args.frames}")
    unit = VAE_SPATIAL_FACTOR * 2
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value < unit or value % unit:
            raise ValueError(f"{name} must be a positive multiple of {unit} (VAE 8x, patch 2), got {value}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a finite number > 0, got {args.shift}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if not (0.0 < args.density <= 1.0):  # NaN fails too
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    if not (0.0 <= args.density_decrement <= 1.0):
        raise ValueError(f"--density-decrement must be in [0, 1], got {args.density_decrement}")
    if args.dense_steps < 0:
        raise ValueError(f"--dense-steps must be >= 0, got {args.dense_steps}")
    if args.refresh_interval < 1:
        raise ValueError(f"--refresh-interval must be >= 1, got {args.refresh_interval}")
    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")


def _preset(args: argparse.Namespace, given: DFSConfig) -> DFSConfig:
    """``--schedule NAME``: the preset's schedule and dense layers with ``--order``; the options
    it replaces must keep their defaults (else a ValueError naming them)."""
    changed = [f"--{f.replace('_', '-')}" for f in ("density", "density_decrement", "dense_steps", "refresh_interval")
               if getattr(given, f) != getattr(DFSConfig(), f)]  # fmt: skip
    if changed:
        raise ValueError(f"--schedule {args.schedule} sets the schedule; drop {', '.join(changed)}")
    return dataclasses.replace(get_schedule_preset(args.schedule), order=args.order)


def _check_writable(path: str, option: str) -> pathlib.Path:
    """Checks that ``path`` can be written (missing folders would be created), naming the option;
    :func:`models.io.check_writable` does the check without leaving anything behind."""
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
    p = pathlib.Path(path)
    if not ((p / "vae" / "config.json").is_file() or (p / "config.json").is_file()):
        raise ValueError(
            f"--mp4: {str(p)!r} holds no diffusers VAE (no config.json in it or in its vae/ folder); "
            "give the VAE folder with --vae"
        )


def _check_sizes(cfg, args: argparse.Namespace, latent_shape) -> tuple[int, ...]:
    """The latent shape ``(1, C, F, H, W)``, checking the size against the model's patch."""
    _, ph, pw = cfg.patch_size
    for name, value, patch in (("--height", args.height, ph), ("--width", args.width, pw)):
        unit = VAE_SPATIAL_FACTOR * patch
        if value % unit:
            raise ValueError(
                f"{name} must be a multiple of {unit} for {cfg.name} (VAE 8x, patch {patch}), got {value}"
            )
    try:
        return (1,) + latent_shape(cfg, args.frames, args.height, args.width)
    except ValueError as err:
        raise ValueError(f"--frames/--height/--width: {err}") from None


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
        raise ValueError(f"--devices {args.devices} --parallel {args.parallel}: {err}") from None
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
    """Wan2.1: config, latent shape, the conditioning (text, negative text or None), token grid."""
    cfg = read_wan_config(args.checkpoint)
    shape = _check_sizes(cfg, args, wan_config.latent_shape)
    guided = args.guidance > 1.0
    cond, uncond = load_prompt_embeds(args.prompt_embeds, text_dim=cfg.text_dim, require_uncond=guided)
    if guided:
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = _pad_text(cond, length), _pad_text(uncond, length)
    negative = jnp.asarray(uncond) if guided else None
    return cfg, shape, jnp.asarray(cond), negative, wan_config.token_grid(cfg, shape[2:])


def _hunyuan_inputs(args: argparse.Namespace):
    """HunyuanVideo: config, latent shape, the conditioning (embedded guidance), token grid."""
    cfg = read_hunyuan_config(args.checkpoint)
    shape = _check_sizes(cfg, args, hunyuan_config.latent_shape)
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
    family = _apply_model_defaults(args)
    _check_options(args)
    dfs = None
    if args.backend == "dfs":
        dfs = dataclasses.replace(
            get_schedule_preset(family.dfs_preset),
            density=args.density,
            density_decrement=args.density_decrement,
            dense_steps=args.dense_steps,
            refresh_interval=args.refresh_interval,
            order=args.order,
        )
        if args.schedule is not None:
            dfs = _preset(args, dfs)
    # 2. Outputs and the optional extra: fail now, not after sampling.
    out = _check_writable(args.out, "--out")
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
    out.parent.mkdir(parents=True, exist_ok=True)
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
