"""What a diffusers Wan repository's own files say, read before any weight: the scheduler
(:func:`read_scheduler`), ``model_index.json``'s pipeline keys (:func:`read_boundary_ratio`) and
the second expert's config (:func:`read_expert_config`), and the checks of the configs against
each other (:func:`check_text_width`, :func:`check_channels`).

A Wan2.2 A14B repository (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``) is a Wan2.1 one with a second
transformer, ``transformer_2/`` (the low-noise expert), and ``boundary_ratio`` in
``model_index.json`` (0.875 for T2V-A14B): ``transformer`` runs the steps whose timestep is
``>= boundary_ratio * num_train_timesteps`` (docs/wan.md, Wan2.2 A14B).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

from dfsattn_jax.checks import check_positive_int
from models.text_encoders.umt5 import UMT5Config
from models.vae import WanVAEConfig
from models.wan.config import WanConfig
from models.wan.loading import read_wan_config

__all__ = [
    "MODEL_INDEX",
    "check_channels",
    "check_text_width",
    "read_boundary_ratio",
    "read_expert_config",
    "read_scheduler",
]

#: The pipeline's own config file at the repository's root.
MODEL_INDEX = "model_index.json"
_SCHEDULER = "UniPCMultistepScheduler"
_PIPELINE = "WanPipeline"


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    """The JSON object in ``file``; a ``ValueError`` naming it when unreadable or not an object."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is not a readable JSON file: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def read_scheduler(path: str | os.PathLike) -> tuple[float, int]:
    """``(flow_shift, num_train_timesteps)`` of a checkpoint's ``scheduler/scheduler_config.json``.

    Raises:
      ValueError: for a missing or malformed file, or a scheduler this pipeline does not run
        (Wan's ``UniPCMultistepScheduler`` with flow sigmas and flow prediction).
    """
    file = pathlib.Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no scheduler/scheduler_config.json")
    config = _read_json(file)
    expected = {"_class_name": _SCHEDULER, "prediction_type": "flow_prediction", "use_flow_sigmas": True}
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        raise ValueError(f"{str(file)!r}: this pipeline runs Wan's UniPC flow scheduler {expected}, got {wrong}")
    shift = config.get("flow_shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"{str(file)!r}: flow_shift must be a positive number, got {shift!r}")
    steps = check_positive_int(config.get("num_train_timesteps", 1000), f"{file}: num_train_timesteps")
    return float(shift), steps


def _listed(entry: Any) -> bool:
    """Whether a ``model_index.json`` component entry names a class (``[null, null]``: absent)."""
    return isinstance(entry, list) and any(part is not None for part in entry)


def read_boundary_ratio(path: str | os.PathLike, pipeline: str = _PIPELINE) -> float | None:
    """``boundary_ratio`` of a repository's ``model_index.json``: ``None`` for one transformer
    (Wan2.1, or no ``model_index.json``), else a number in ``(0, 1)`` with a ``transformer_2/``
    folder listed beside it. ``pipeline``: the diffusers class the file must name
    (``"WanPipeline"``, or ``"WanImageToVideoPipeline"``).

    Raises:
      ValueError: naming the file and the key: a malformed file, another pipeline class,
        ``expand_timesteps`` (Wan2.2-TI2V-5B, not run here), a
        ``boundary_ratio`` that is not a number in ``(0, 1)``, a ``boundary_ratio`` without
        ``transformer_2`` or a ``transformer_2`` without ``boundary_ratio``.
    """
    root = pathlib.Path(path)
    file = root / MODEL_INDEX
    if not file.is_file():
        return None
    index = _read_json(file)
    name = index.get("_class_name", pipeline)
    if name != pipeline:
        raise ValueError(f"{str(file)!r}: this pipeline reads a {pipeline} repository, got {name!r}")
    if index.get("expand_timesteps"):
        raise ValueError(f"{str(file)!r}: expand_timesteps (Wan2.2-TI2V-5B) is not supported")
    ratio = index.get("boundary_ratio")
    second = _listed(index.get("transformer_2"))
    if ratio is None:
        if second:
            raise ValueError(f"{str(file)!r} lists transformer_2 without a boundary_ratio: it would never run")
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio < 1:
        raise ValueError(f"{str(file)!r}: boundary_ratio must be a number in (0, 1), got {ratio!r}")
    if not second or not (root / "transformer_2").is_dir():
        raise ValueError(
            f"{str(file)!r} sets boundary_ratio={ratio!r} but the repository has no transformer_2 "
            "(the low-noise expert) listed and in its transformer_2/ folder"
        )
    return float(ratio)


def read_expert_config(root: pathlib.Path, config: WanConfig) -> WanConfig:
    """``transformer_2/``'s config after checking it has ``transformer/``'s shape (``config``),
    as the two experts of one sampling loop must.

    Raises:
      ValueError: naming ``transformer_2`` and both configs.
    """
    expert = read_wan_config(root / "transformer_2")
    if dataclasses.replace(expert, name=config.name) != config:
        raise ValueError(f"transformer_2's config {expert} must have transformer's shape {config}")
    return expert


def check_text_width(config: UMT5Config, text_dim: int) -> None:
    """Checks that the text encoder's width is the transformer's ``text_dim`` (from the configs,
    before any weight is read).

    Raises:
      ValueError: naming both widths.
    """
    if config.d_model != text_dim:
        raise ValueError(
            f"the text encoder's width d_model={config.d_model} is not the transformer's text_dim={text_dim}"
        )


def check_channels(config: WanConfig, vae_config: WanVAEConfig, *, image_to_video: bool) -> None:
    """Checks the transformer's latent channels against the VAE's ``z_dim`` (from the configs):
    text to video takes and gives ``z_dim``; image to video takes the noise, the mask
    (``temporal_factor`` channels) and the image's latents, ``2 z_dim + temporal_factor``, and
    gives ``z_dim``.

    Raises:
      ValueError: naming both channel counts and what they must be.
    """
    z = vae_config.z_dim
    want = 2 * z + vae_config.temporal_factor if image_to_video else z
    if config.in_channels != want or config.out_channels != z:
        what = "noise, mask and image latents: image to video" if image_to_video else "text to video"
        raise ValueError(
            f"the transformer's in_channels={config.in_channels} and out_channels={config.out_channels} must be "
            f"{want} and the VAE's z_dim={z} ({what})"
        )
