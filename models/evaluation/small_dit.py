"""The small video DiTs trained here (``python -m benchmarks.train_small``), their registry and loaders.

No pretrained video model can be downloaded here, and random weights have no attention
structure, so the quality harness uses small Wan2.1-architecture DiTs trained on the synthetic
clips of :mod:`models.evaluation.clips` (flow matching, optax AdamW, minutes on one H200).
Two models are registered in :data:`SMALL_DIT_MODELS` (:func:`get_small_dit`):

``v1`` (:data:`SMALL_DIT_CONFIG`, WanConfig ``small-video-dit``)
  dim 256, 6 layers, 4 heads of 64, FFN 1024, text dim 64, 3 latent channels, patch (1, 2, 2):
  6.9 M parameters. Clips of 16 frames × 64×64 px (:class:`~models.evaluation.codec.LatentCodec`
  with ``space_to_depth=1``: latent ``[3, 16, 64, 64]``) give a 16×32×32 token grid, 16,384
  tokens = 128 blocks of 128: a raster block is exactly 4 whole rows of one frame.
``v2`` (:data:`SMALL_DIT_V2_CONFIG`, WanConfig ``small-video-dit-v2``)
  a grid shaped like Wan2.1's (21×30×52 at 480p): clips of 16 frames × 60×108 px, latent
  ``[3, 16, 60, 108]``, token grid 16×30×54 = 25,920 tokens = 203 blocks of 128, the last one
  half full; sides that are not powers of two, so a raster block spans 2.4 rows and crosses row
  and frame ends. dim 512, 4 layers, 8 heads of 64, FFN 1024: 14.8 M parameters, 29.7 MB in
  bfloat16, shipped as two files of at most 16 MiB.

Conditioning (:class:`ClipConditioner`): a learned embedding of the clip's background photo
(``n`` tokens) followed by one of its motion class (``n`` tokens), each ``text_dim`` wide, fed
to the cross-attention as ``encoder_hidden_states [B, 2n, text_dim]``. Index ``NUM_PHOTOS`` /
``NUM_MOTIONS`` is the learned "null" embedding used for classifier-free guidance.

Weights files (written by :func:`models.evaluation.harness_weights.save_small_video_dit`: one
file or shards of at most 16 MiB, with a ``.sha256``) hold the transformer and the conditioner,
with the :class:`SmallDiTConfig` as JSON in the header metadata. The loaders here
(:func:`load_small_dit`, :func:`load_small_video_dit`, :func:`load_clip_conditioner`) verify the
checksums, read the files once (:mod:`models.evaluation.harness_weights`) and build the modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_int_fields, lookup
from models.evaluation.clips import NUM_MOTIONS, NUM_PHOTOS, ClipConfig
from models.evaluation.codec import LatentCodec, token_grid as clip_token_grid
from models.evaluation.harness_weights import read_sharded, unflatten_into, verify_weights
from models.wan.config import WanConfig, default_dtype
from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "SMALL_WAN_CONFIG",
    "SMALL_WAN_V2_CONFIG",
    "SmallDiTConfig",
    "SMALL_DIT_CONFIG",
    "SMALL_DIT_V2_CONFIG",
    "SMOKE_DIT_CONFIG",
    "SMOKE_HARNESS_CONFIG",
    "SmallDiTModel",
    "SMALL_DIT_MODELS",
    "get_small_dit",
    "ClipConditioner",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "default_weights_path",
    "load_small_dit",
    "random_small_dit",
    "load_small_video_dit",
    "load_clip_conditioner",
]

SMALL_WAN_CONFIG = WanConfig(
    name="small-video-dit",
    dim=256,
    num_layers=6,
    num_heads=4,
    ffn_dim=1024,
    text_dim=64,
    in_channels=3,
    out_channels=3,
    freq_dim=128,
    text_len=4,
)
#: The second harness model: 8 heads of 64 (the Hopper kernel's head dim), 4 layers, at the
#: largest width whose bfloat16 weights stay near 30 MB (two files of at most 16 MiB).
SMALL_WAN_V2_CONFIG = SMALL_WAN_CONFIG.replace(name="small-video-dit-v2", dim=512, num_layers=4, num_heads=8)

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "small_video_dit.safetensors"


@dataclasses.dataclass(frozen=True)
class SmallDiTConfig:
    """Everything that defines the small video DiT besides its weights.

    Attributes:
      wan: the transformer's :class:`~models.wan.config.WanConfig`.
      clip: the clips it was trained on.
      codec: the pixels ↔ latent map.
      tokens_per_field: conditioning tokens for the photo and for the motion (text length 2n).
      train_shift: shift of the training σ distribution (σ = s u / (1 + (s - 1) u), u logit-normal).
      sample_shift: flow shift to sample with (the sampler's default, Wan's 5.0).
      guidance_scale: classifier-free guidance scale to sample with.
    """

    wan: WanConfig = SMALL_WAN_CONFIG
    clip: ClipConfig = ClipConfig()
    codec: LatentCodec = LatentCodec()
    tokens_per_field: int = 2
    train_shift: float = 3.0
    sample_shift: float = 5.0
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        if self.wan.in_channels != self.codec.channels or self.wan.out_channels != self.codec.channels:
            raise ValueError(
                f"wan in/out channels ({self.wan.in_channels}, {self.wan.out_channels}) must equal the "
                f"codec's latent channels ({self.codec.channels})"
            )
        check_int_fields(self, ("tokens_per_field",))
        self.latent_shape  # validates the clip/codec/patch combination

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, H, W)`` of the model's input latents."""
        s = self.codec.space_to_depth
        clip_token_grid(self.clip, self.codec, self.wan.patch_size)  # raises if the patch does not fit
        return (self.codec.channels, self.clip.frames, self.clip.height // s, self.clip.width // s)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return clip_token_grid(self.clip, self.codec, self.wan.patch_size)

    @property
    def text_len(self) -> int:
        return 2 * self.tokens_per_field

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SmallDiTConfig":
        raw = json.loads(text)
        wan = dict(raw["wan"])
        wan["patch_size"] = tuple(wan["patch_size"])
        return cls(
            wan=WanConfig(**wan),
            clip=ClipConfig(**raw["clip"]),
            codec=LatentCodec(**raw["codec"]),
            tokens_per_field=int(raw["tokens_per_field"]),
            train_shift=float(raw["train_shift"]),
            sample_shift=float(raw["sample_shift"]),
            guidance_scale=float(raw["guidance_scale"]),
        )


SMALL_DIT_CONFIG = SmallDiTConfig()
#: A CPU-sized variant for smoke tests: 4 frames × 16×16 px → a 4×8×8 token grid (256 tokens).
SMOKE_DIT_CONFIG = SmallDiTConfig(
    wan=WanConfig(
        name="smoke-video-dit", dim=64, num_layers=2, num_heads=2, ffn_dim=128, text_dim=16,
        in_channels=3, out_channels=3, freq_dim=32, text_len=4,
    ),
    clip=ClipConfig(frames=4, height=16, width=16),
)  # fmt: skip
#: The smoke model on 4×32×32-px clips (a 4×16×16 grid of 1,024 tokens): the CPU ``--quick`` runs
#: of the quality benchmark and the schedule search.
SMOKE_HARNESS_CONFIG = dataclasses.replace(SMOKE_DIT_CONFIG, clip=ClipConfig(frames=4, height=32, width=32))
#: The v2 harness model: 16 frames × 60×108 px → a 16×30×54 token grid (25,920 tokens = 203
#: blocks of 128, the last one half full), like Wan2.1's 21×30×52 at 480p.
SMALL_DIT_V2_CONFIG = SmallDiTConfig(wan=SMALL_WAN_V2_CONFIG, clip=ClipConfig(frames=16, height=60, width=108))


@dataclasses.dataclass(frozen=True)
class SmallDiTModel:
    """A registered small video DiT: its configuration and its shipped weights.

    Attributes:
      name: the registry key (``"v1"``, ``"v2"``).
      config: the model's :class:`SmallDiTConfig`.
      weights: file name in :data:`WEIGHTS_DIR`: the weights file, or the name that stands for
        its shards (``<stem>-0000i-of-0000N.safetensors``;
        :func:`models.evaluation.harness_weights.weights_files`).
      description: one line for reports.
    """

    name: str
    config: SmallDiTConfig
    weights: str
    description: str

    @property
    def weights_path(self) -> pathlib.Path:
        return WEIGHTS_DIR / self.weights


#: The registered models; add an entry to ship another one.
SMALL_DIT_MODELS: dict[str, SmallDiTModel] = {
    "v1": SmallDiTModel(
        "v1", SMALL_DIT_CONFIG, WEIGHTS_FILE,
        "small-video-dit: 6 layers × 4 heads, 16×32×32 tokens (128 whole blocks)",
    ),
    "v2": SmallDiTModel(
        "v2", SMALL_DIT_V2_CONFIG, "small_video_dit_v2.safetensors",
        "small-video-dit-v2: 4 layers × 8 heads, 16×30×54 tokens (203 blocks, the last partial)",
    ),
}  # fmt: skip


def get_small_dit(name: str) -> SmallDiTModel:
    """The registered model ``name`` (``ValueError`` listing the names otherwise)."""
    return lookup(SMALL_DIT_MODELS, name, "model")


class ClipConditioner(nnx.Module):
    """Learned conditioning tokens: photo embedding then motion embedding.

    Attributes:
      photo: Param float32[NUM_PHOTOS + 1, n, text_dim] (last row: the null embedding).
      motion: Param float32[NUM_MOTIONS + 1, n, text_dim] (last row: the null embedding).
    """

    def __init__(self, tokens_per_field: int, text_dim: int, *, rngs: nnx.Rngs):
        self.photo = nnx.Param(jax.random.normal(rngs.params(), (NUM_PHOTOS + 1, tokens_per_field, text_dim)))
        self.motion = nnx.Param(jax.random.normal(rngs.params(), (NUM_MOTIONS + 1, tokens_per_field, text_dim)))

    def __call__(self, photo: Int[Array, " b"], motion: Int[Array, " b"]) -> Float[Array, "b t e"]:
        """``[B, 2n, text_dim]`` tokens; pass ``NUM_PHOTOS`` / ``NUM_MOTIONS`` for the null embedding."""
        photo = jnp.asarray(photo, jnp.int32)
        motion = jnp.asarray(motion, jnp.int32)
        return jnp.concatenate([self.photo[...][photo], self.motion[...][motion]], axis=1)

    def unconditional(self, batch: int) -> Float[Array, "b t e"]:
        """The null conditioning (negative prompt of classifier-free guidance): ``[B, 2n, text_dim]``."""
        return self(jnp.full((batch,), NUM_PHOTOS), jnp.full((batch,), NUM_MOTIONS))


# ----------------------------------------------------------------------------------------------
# Loaders


def default_weights_path(model: str = "v1") -> pathlib.Path:
    """Where the registered ``model``'s shipped weights live (a file or the name of its shards)."""
    return get_small_dit(model).weights_path


def _read(path: str | os.PathLike | None, verify: bool) -> tuple[dict[str, np.ndarray], SmallDiTConfig, dict[str, str]]:
    path = pathlib.Path(path) if path is not None else default_weights_path()
    tensors, metadata = read_sharded(path, verify=verify)
    if "config" not in metadata:
        raise ValueError(f"weights file {str(path)!r} has no 'config' metadata")
    return tensors, SmallDiTConfig.from_json(metadata["config"]), metadata


def _weights_path(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """A registered model name (``"v1"``, ``"v2"``) stands for its shipped weights."""
    if isinstance(path, str) and path in SMALL_DIT_MODELS:
        return get_small_dit(path).weights_path
    return path


def _transformer_from(
    tensors: dict[str, np.ndarray], config: SmallDiTConfig, dtype, param_dtype
) -> WanTransformer3DModel:
    """The transformer of ``config`` with the ``transformer.*`` tensors of a weights file."""
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else default_dtype()
    model = nnx.eval_shape(
        lambda: WanTransformer3DModel(config.wan, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten_into(nnx.to_pure_dict(state), tensors, "transformer."))
    nnx.update(model, state)
    return model


def _conditioner_from(tensors: dict[str, np.ndarray], config: SmallDiTConfig) -> ClipConditioner:
    """The float32 :class:`ClipConditioner` of ``config`` with the ``conditioner.*`` tensors."""
    conditioner = nnx.eval_shape(lambda: ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(0)))
    state = nnx.state(conditioner, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten_into(nnx.to_pure_dict(state), tensors, "conditioner."))
    nnx.update(conditioner, state)
    return conditioner


def load_small_dit(
    path: str | os.PathLike | None = None, *, dtype=None, param_dtype=None, verify: bool = True
) -> tuple[WanTransformer3DModel, ClipConditioner, SmallDiTConfig, dict[str, Any]]:
    """Loads a small video DiT and its conditioner from one read of its weights:
    ``(model, conditioner, config, meta)``.

    Args:
      path: a weights file or the name of its shards, or a registered model name (``"v1"``,
        ``"v2"``: its shipped weights); default: the v1 model's shipped weights.
      dtype, param_dtype: the transformer's activation / parameter dtypes (default: bf16 on
        accelerators, float32 on CPU; the float32 modules of Wan stay float32); the
        conditioner is float32.
      verify: check every file against its ``.sha256`` first (raises ``ValueError`` on mismatch).

    Returns:
      ``meta`` is ``{"weights": pathlib.Path read, "sha256": {file name: SHA-256} (verified;
      ``None`` without ``verify``), "metadata": the files' header metadata}``.
    """
    path = pathlib.Path(_weights_path(path) if path is not None else default_weights_path())
    digests = verify_weights(path) if verify else None
    tensors, config, metadata = _read(path, verify=False)
    model = _transformer_from(tensors, config, dtype, param_dtype)
    meta = {"weights": path, "sha256": digests, "metadata": metadata}
    return model, _conditioner_from(tensors, config), config, meta


def random_small_dit(config: SmallDiTConfig, seed: int = 1234) -> tuple[WanTransformer3DModel, ClipConditioner]:
    """The architecture of ``config`` with random weights (initialisers of ``nnx.Rngs(seed)`` for
    the transformer, ``nnx.Rngs(seed + 1)`` for the conditioner; default dtypes): the benches'
    ``--quick`` / ``--random`` model."""
    model = WanTransformer3DModel(config.wan, rngs=nnx.Rngs(seed))
    return model, ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(seed + 1))


def load_small_video_dit(
    path: str | os.PathLike | None = None, *, dtype=None, param_dtype=None, verify: bool = True
) -> tuple[WanTransformer3DModel, SmallDiTConfig]:
    """Loads a small video DiT's transformer: ``(model, config)``; arguments as :func:`load_small_dit`
    (which loads the conditioner from the same read)."""
    tensors, config, _ = _read(_weights_path(path), verify)
    return _transformer_from(tensors, config, dtype, param_dtype), config


def load_clip_conditioner(path: str | os.PathLike | None = None, *, verify: bool = True) -> ClipConditioner:
    """Loads a small video DiT's :class:`ClipConditioner` (float32); ``path`` as :func:`load_small_dit`."""
    tensors, config, _ = _read(_weights_path(path), verify)
    return _conditioner_from(tensors, config)
