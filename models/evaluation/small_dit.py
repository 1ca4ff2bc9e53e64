"""The small video DiT trained here (``benchmarks/train_small.py``) and its loader.

No pretrained video model can be downloaded here, and random weights have no attention
structure, so the quality harness uses a small Wan2.1-architecture DiT trained on the synthetic
clips of :mod:`models.evaluation.clips` (flow matching, optax AdamW, a few minutes on one H100).

The model (:data:`SMALL_WAN_CONFIG`): dim 256, 6 layers, 4 heads of 64, FFN 1024, text dim 64,
3 latent channels, patch (1, 2, 2): 6.9 M parameters. Clips of 16 frames × 64×64 px
(:class:`~models.evaluation.codec.LatentCodec` with ``space_to_depth=1``: latent ``[3, 16, 64, 64]``) give a
16×32×32 token grid, 16,384 tokens = 128 blocks of 128.

Conditioning (:class:`ClipConditioner`): a learned embedding of the clip's background photo
(``n`` tokens) followed by one of its motion class (``n`` tokens), each ``text_dim`` wide, fed
to the cross-attention as ``encoder_hidden_states [B, 2n, text_dim]``. Index ``NUM_PHOTOS`` /
``NUM_MOTIONS`` is the learned "null" embedding used for classifier-free guidance.

The shipped file ``models/evaluation/weights/small_video_dit.safetensors`` holds the transformer parameters
(``transformer.<nnx path>``, bfloat16) and the conditioner tables (``conditioner.photo``,
``conditioner.motion``), with the :class:`SmallDiTConfig` as JSON in the header metadata;
``small_video_dit.safetensors.sha256`` holds its SHA-256 (``sha256sum`` format). The loaders
verify it before reading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from models.evaluation.clips import NUM_MOTIONS, NUM_PHOTOS, ClipConfig
from models.evaluation.codec import LatentCodec, token_grid as clip_token_grid
from models.wan.config import WanConfig, default_dtype
from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "SMALL_WAN_CONFIG",
    "SmallDiTConfig",
    "SMALL_DIT_CONFIG",
    "SMOKE_DIT_CONFIG",
    "ClipConditioner",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "default_weights_path",
    "file_sha256",
    "read_checksum",
    "verify_checksum",
    "flatten_state",
    "unflatten_into",
    "save_small_video_dit",
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
        if not isinstance(self.tokens_per_field, int) or self.tokens_per_field < 1:
            raise ValueError(f"tokens_per_field must be a positive integer, got {self.tokens_per_field!r}")
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
# Files and checksums


def default_weights_path() -> pathlib.Path:
    return WEIGHTS_DIR / WEIGHTS_FILE


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def read_checksum(path: str | os.PathLike) -> str:
    """The expected SHA-256 of ``path`` from ``<path>.sha256`` (``sha256sum`` format)."""
    path = pathlib.Path(path)
    sums = _checksum_path(path)
    if not sums.is_file():
        raise ValueError(f"path {str(path)!r} has no checksum file {str(sums)!r}")
    text = sums.read_text().split()
    if not text or len(text[0]) != 64:
        raise ValueError(f"checksum file {str(sums)!r} does not start with a SHA-256 hex digest")
    return text[0].lower()


def verify_checksum(path: str | os.PathLike) -> str:
    """Checks ``path`` against ``<path>.sha256``; returns the digest or raises ``ValueError``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist (train it with benchmarks/train_small.py)")
    expected = read_checksum(path)
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"weights file {str(path)!r} has SHA-256 {actual}, its checksum file says {expected}")
    return actual


def flatten_state(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A pure nested dict (``nnx.to_pure_dict(state)``) → ``{"a.b.0.c": array}``."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out[prefix + ".".join(keys)] = np.asarray(leaf)
    return out


def unflatten_into(template: Any, flat: dict[str, np.ndarray], prefix: str = "", *, dtype=None) -> Any:
    """Fills the leaves of ``template`` (a pure nested dict) from ``flat`` by name.

    Each leaf is cast to the template's dtype (or ``dtype`` when given). Raises ``ValueError``
    listing missing keys or shape mismatches; extra keys under ``prefix`` are an error too.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = list(flatten_state(template, prefix))
    missing = [n for n in names if n not in flat]
    extra = [k for k in flat if k.startswith(prefix) and k not in set(names)]
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    values = []
    for name, (_, leaf) in zip(names, leaves):
        array = flat[name]
        if tuple(array.shape) != tuple(leaf.shape):
            raise ValueError(f"weights tensor {name!r} has shape {array.shape}, the model expects {leaf.shape}")
        values.append(jnp.asarray(array, dtype or leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def save_small_video_dit(
    path: str | os.PathLike,
    model: WanTransformer3DModel,
    conditioner: ClipConditioner,
    config: SmallDiTConfig,
    *,
    dtype=jnp.bfloat16,
    metadata: dict[str, str] | None = None,
) -> str:
    """Writes the weights (transformer in ``dtype``, conditioner float32) and ``<path>.sha256``.

    Both files are written atomically (:func:`models.io.atomic_write_bytes`; parent folders are
    created), the weights first: a kill leaves the old pair, or new weights whose checksum file
    does not match yet (which :func:`verify_checksum` reports), never a truncated weights file.
    Returns the SHA-256 digest.
    """
    from safetensors.numpy import save

    from models.io import atomic_write_bytes, atomic_write_text

    path = pathlib.Path(path)
    tensors = {
        k: np.asarray(jnp.asarray(v, dtype))
        for k, v in flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "transformer.").items()
    }
    tensors.update(flatten_state(nnx.to_pure_dict(nnx.state(conditioner, nnx.Param)), "conditioner."))
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"config": config.to_json(), "format": "dfsattn-jax small video DiT v1"}
    meta.update(metadata or {})
    data = save(tensors, metadata=meta)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_text(_checksum_path(path), f"{digest}  {path.name}\n")
    return digest


def _read(path: str | os.PathLike | None, verify: bool) -> tuple[dict[str, np.ndarray], SmallDiTConfig, dict[str, str]]:
    from safetensors import safe_open

    path = pathlib.Path(path) if path is not None else default_weights_path()
    if verify:
        verify_checksum(path)
    elif not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in metadata:
        raise ValueError(f"weights file {str(path)!r} has no 'config' metadata")
    return tensors, SmallDiTConfig.from_json(metadata["config"]), metadata


def load_small_video_dit(
    path: str | os.PathLike | None = None, *, dtype=None, param_dtype=None, verify: bool = True
) -> tuple[WanTransformer3DModel, SmallDiTConfig]:
    """Loads the shipped small video DiT: ``(model, config)``.

    Args:
      path: the safetensors file (default ``models/evaluation/weights/small_video_dit.safetensors``).
      dtype, param_dtype: activation / parameter dtypes (default: bf16 on accelerators, float32
        on CPU; the float32 modules of Wan stay float32).
      verify: check the file against its ``.sha256`` first (raises ``ValueError`` on mismatch).
    """
    tensors, config, _ = _read(path, verify)
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else default_dtype()
    model = nnx.eval_shape(
        lambda: WanTransformer3DModel(config.wan, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    state = nnx.state(model, nnx.Param)
    pure = unflatten_into(nnx.to_pure_dict(state), tensors, "transformer.")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model, config


def load_clip_conditioner(path: str | os.PathLike | None = None, *, verify: bool = True) -> ClipConditioner:
    """Loads the shipped model's :class:`ClipConditioner` (float32)."""
    tensors, config, _ = _read(path, verify)
    conditioner = nnx.eval_shape(lambda: ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(0)))
    state = nnx.state(conditioner, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten_into(nnx.to_pure_dict(state), tensors, "conditioner."))
    nnx.update(conditioner, state)
    return conditioner
