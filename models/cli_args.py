"""The ``dfsattn-generate`` command line's arguments: the parser, the ``--model`` families' defaults,
the checks of the options that no library entry point makes before the weights are read, the
:class:`~dfsattn_jax.schedule.DFSConfig` of the options, and :func:`option_error`, which words a
library's ``ValueError`` for the command line (the demo uses it too).

A value that a library entry point validates (``DFSConfig``'s fields, the video size, the device
count) is not re-checked here: the entry point is called before any weight is read and its error,
which names its argument (``density must be in (0, 1], got 1.5``), is re-worded to name the option
(``--density must be in (0, 1], got 1.5``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping

from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import SCHEDULE_PRESETS, DFSConfig, get_schedule_preset
from models.text_encoders.prompts import DEFAULT_MAX_SEQUENCE_LENGTH
from models.common.parallel import PARALLEL_MODES
from models.io import VAE_RECIPES
from models.sampling import SOLVER_NAMES

__all__ = [
    "DFS_OPTIONS",
    "MODEL_DEFAULTS",
    "MODEL_NAMES",
    "OUT_SUFFIXES",
    "PROG",
    "SCHEDULE_OPTIONS",
    "VAE_EXTRA_INSTALL",
    "VIDEO_SUFFIXES",
    "ModelDefaults",
    "apply_model_defaults",
    "build_parser",
    "check_options",
    "default_shift",
    "dfs_config",
    "option_error",
    "renamed",
]

PROG = "dfsattn-generate"
#: How to install what ``--mp4`` needs (the ``vae`` extra).
VAE_EXTRA_INSTALL = 'pip install -e ".[vae]"'
#: What ``--out`` writes, by its suffix: the latents, or the video decoded in JAX (wan2.1).
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".gif")
OUT_SUFFIXES: tuple[str, ...] = (".safetensors",) + VIDEO_SUFFIXES
#: Height from which Wan's flow shift is the 720p value.
SHIFT_720P_HEIGHT = 720
_HELP_WIDTH = 100  # fixed, so that --help reads the same everywhere (and in the docs)
#: The defaults of the schedule options: DFSConfig's.
_DFS_DEFAULTS = DFSConfig()
_PRESET = "the schedule preset's"
#: The option that sets each :class:`~dfsattn_jax.schedule.DFSConfig` field (the tile and block
#: sizes and the always-dense layers come with the ``--model``'s or ``--schedule``'s preset).
DFS_OPTIONS: dict[str, str] = {
    "density": "--density",
    "density_decrement": "--density-decrement",
    "dense_steps": "--dense-steps",
    "refresh_interval": "--refresh-interval",
    "order": "--order",
    "tile_size": f"{_PRESET} tile_size",
    "block_size": f"{_PRESET} block_size",
    "dense_layers": f"{_PRESET} dense_layers",
}
#: The DFSConfig fields that ``--schedule NAME`` sets (their options must then be left out).
SCHEDULE_OPTIONS: tuple[str, ...] = ("density", "density_decrement", "dense_steps", "refresh_interval")


def renamed(message: str, options: Mapping[str, str]) -> str | None:
    """``message`` with its leading argument name replaced by the option that sets it, or ``None``
    when it does not start with a key of ``options``: a library error names its argument first
    (``"density must be in (0, 1], got 1.5"`` -> ``"--density must be in (0, 1], got 1.5"``)."""
    name, space, rest = message.partition(" ")
    return f"{options[name]} {rest}" if space and name in options else None


def option_error(err: ValueError, options: Mapping[str, str], context: str | None = None) -> ValueError:
    """``err`` worded for the command line, for ``raise option_error(err, ...) from None``: its
    argument name replaced by the option (:func:`renamed`); otherwise its message, after
    ``"<context>: "`` when ``context`` is given (e.g. ``"--frames/--height/--width"``)."""
    message = str(err)
    option_message = renamed(message, options)
    if option_message is not None:
        return ValueError(option_message)
    return ValueError(message if context is None else f"{context}: {message}")


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
        usage="%(prog)s --checkpoint DIR (--prompt TEXT | --prompt-embeds FILE) [options]",
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
    io.add_argument("--prompt", default=None, metavar="TEXT",
                    help="wan2.1: the prompt, encoded in JAX with the checkpoint's text_encoder/ and tokenizer/ "
                         "(no PyTorch); give it or --prompt-embeds (default: none)")
    io.add_argument("--negative-prompt", default=None, metavar="TEXT",
                    help="wan2.1, with --prompt and guidance: the negative prompt (default: none: diffusers' empty one)")
    io.add_argument("--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH, metavar="N",
                    help="text tokens of --prompt")
    io.add_argument("--prompt-embeds", default=None, metavar="FILE",
                    help="instead of --prompt: wan2.1: safetensors with 'cond' and 'uncond' [T, text_dim] (UMT5 "
                         "output; 'uncond' only with guidance); hunyuan-video: .safetensors or .npz with "
                         "'prompt_embeds' [T, 4096], 'prompt_attention_mask' [T], 'pooled_prompt_embeds' [768] "
                         "(default: none)")
    io.add_argument("--out", default="out/latents.safetensors", metavar="FILE",
                    help="the final latents (.safetensors), or, for wan2.1, the video decoded in JAX with the "
                         "checkpoint's vae/ (.mp4 through imageio-ffmpeg; .gif; an .mp4 falls back to a .gif "
                         "beside it when no encoder is installed)")
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
    dfs.add_argument("--density", type=float, metavar="D", default=_DFS_DEFAULTS.density,
                     help="kept fraction of key blocks at the first refresh, in (0, 1]")
    dfs.add_argument("--density-decrement", type=float, metavar="D", default=_DFS_DEFAULTS.density_decrement,
                     help="density dropped at each later refresh, in [0, 1] (0: refresh forever)")
    dfs.add_argument("--dense-steps", type=int, metavar="N", default=_DFS_DEFAULTS.dense_steps,
                     help="leading steps that run dense, >= 0")
    dfs.add_argument("--refresh-interval", type=int, metavar="N", default=_DFS_DEFAULTS.refresh_interval,
                     help="steps between mask refreshes, >= 1")
    dfs.add_argument("--order", choices=ORDER_NAMES, default=_DFS_DEFAULTS.order, help="token order of the blocks")
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


def apply_model_defaults(args: argparse.Namespace) -> ModelDefaults:
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


def check_options(args: argparse.Namespace) -> None:
    """Checks the numbers that only the sampler would check, after the weights are read
    (raises a ValueError naming the option). The video size, the DFS schedule and the device
    count are checked by their library entry points (:func:`dfs_config`, the family's
    ``latent_shape``, :func:`models.common.parallel.make_parallel`)."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a finite number > 0, got {args.shift}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if (args.prompt is None) == (args.prompt_embeds is None):
        raise ValueError("give one of --prompt TEXT and --prompt-embeds FILE")
    if args.prompt is not None and args.model != "wan2.1":
        raise ValueError(f"--prompt encodes with Wan's UMT5; for --model {args.model} give --prompt-embeds")
    if args.negative_prompt is not None and args.prompt is None:
        raise ValueError("--negative-prompt goes with --prompt (--prompt-embeds holds its own 'uncond')")
    if args.max_sequence_length < 1:
        raise ValueError(f"--max-sequence-length must be >= 1, got {args.max_sequence_length}")
    suffix = os.path.splitext(args.out)[1].lower()
    if suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out must end in one of {OUT_SUFFIXES}, got {args.out!r}")
    if suffix in VIDEO_SUFFIXES and args.model != "wan2.1":
        raise ValueError(f"--out {suffix} decodes with the Wan VAE in JAX; for --model {args.model} use --mp4")


def dfs_config(args: argparse.Namespace, family: ModelDefaults) -> DFSConfig:
    """The :class:`~dfsattn_jax.schedule.DFSConfig` of the options, built (and so validated) once.

    Without ``--schedule``: the ``--model`` family's preset (its tile and block sizes and dense
    layers) with the schedule options and ``--order``. With ``--schedule NAME``: that preset with
    ``--order``; the schedule options it replaces must then be left out.

    Raises:
      ValueError: naming the option (:data:`DFS_OPTIONS`): a value DFSConfig refuses, or a
        schedule option given with ``--schedule``.
    """
    if args.schedule is not None:
        changed = [DFS_OPTIONS[f] for f in SCHEDULE_OPTIONS if getattr(args, f) != getattr(_DFS_DEFAULTS, f)]
        if changed:
            raise ValueError(f"--schedule {args.schedule} sets the schedule; drop {', '.join(changed)}")
        base, changes = get_schedule_preset(args.schedule), {}
    else:
        base, changes = get_schedule_preset(family.dfs_preset), {f: getattr(args, f) for f in SCHEDULE_OPTIONS}
    try:
        return dataclasses.replace(base, **changes, order=args.order)
    except ValueError as err:
        raise option_error(err, DFS_OPTIONS) from None
