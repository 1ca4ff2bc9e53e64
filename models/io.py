"""Files around a real Wan2.1 or HunyuanVideo run: prompt embeddings in, latents out, optional MP4.

* :func:`load_prompt_embeds` reads the text-encoder output the user made with their own UMT5
  (see the README section "Using real Wan2.1 weights"): a safetensors file with ``cond`` and
  (for classifier-free guidance) ``uncond``, each ``[T, text_dim]`` or ``[1, T, text_dim]``.
* :func:`load_hunyuan_prompt_embeds` reads HunyuanVideo's: a ``.safetensors`` or ``.npz`` file
  with ``prompt_embeds [T, 4096]`` (the LLM's), ``prompt_attention_mask [T]`` (1 for valid
  tokens, right-padded) and ``pooled_prompt_embeds [768]`` (CLIP's), each optionally with a
  leading batch axis of 1; :func:`save_hunyuan_prompt_embeds` writes one.
* :func:`save_latents` / :func:`load_latents` write and read the final latents
  ``[B, C, F, H, W]`` as float32 safetensors (key ``latents``, plus string metadata).
* :func:`decode_to_mp4` decodes latents with diffusers' VAE of the model family
  (``AutoencoderKLWan`` or ``AutoencoderKLHunyuanVideo``) and writes an MP4. It needs the
  optional extra (``torch``, ``diffusers``, ``imageio``, ``imageio-ffmpeg``), imported lazily:
  without them it raises an ``ImportError`` that says what to install.

Every file is written atomically (:func:`models.common.files.atomic_write_bytes`): a kill during
an overwrite leaves the old file intact.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from typing import Any, Mapping, NamedTuple

import numpy as np
from jaxtyping import Float, Int

from models.common.files import atomic_write, atomic_write_bytes, component_folder

__all__ = [
    "PROMPT_KEYS",
    "LATENTS_KEY",
    "VAE_EXTRA_HINT",
    "load_prompt_embeds",
    "save_prompt_embeds",
    "HUNYUAN_PROMPT_KEYS",
    "HunyuanPromptEmbeds",
    "load_hunyuan_prompt_embeds",
    "save_hunyuan_prompt_embeds",
    "save_latents",
    "load_latents",
    "decode_to_mp4",
    "VAE_RECIPES",
]

PROMPT_KEYS = ("cond", "uncond")
LATENTS_KEY = "latents"
VAE_EXTRA_HINT = "pip install torch diffusers transformers accelerate imageio imageio-ffmpeg"


def _read_arrays(
    p: pathlib.Path,
    keys: tuple[str, ...],
    what: str,
    *,
    optional: tuple[str, ...] = (),
    npz: bool = True,
    needed_for: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """The tensors ``keys`` that a ``.safetensors`` or ``.npz`` file holds (floating ones as float32,
    bfloat16 and float64 included; others as stored); the ``optional`` keys only when present.

    The suffix picks the format: ``.npz`` a NumPy archive, ``.safetensors`` safetensors. With
    ``npz=False`` (Wan's prompt files, safetensors whatever their name) a ``.npz`` is refused and
    any other suffix is read as safetensors; with ``npz=True`` any other suffix is refused.

    Raises:
      ValueError: naming the file (``what`` says which): missing, unreadable, a refused suffix, or
        a missing key (with the file's keys, and why the key is needed when ``needed_for`` says).
    """
    if not p.is_file():
        raise ValueError(f"{what} file {str(p)!r} does not exist")
    out: dict[str, np.ndarray] = {}
    if p.suffix == ".npz":
        if not npz:
            raise ValueError(f"{what} file {str(p)!r} must be a safetensors file, got a .npz file")
        try:
            with np.load(p, allow_pickle=False) as data:
                out = {key: np.asarray(data[key]) for key in keys if key in data.files}
                present = sorted(data.files)
        except Exception as err:  # a corrupt archive raises several error types
            raise ValueError(f"{what} file {str(p)!r} is not a readable .npz file: {err}") from None
    elif p.suffix == ".safetensors" or not npz:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="flax") as f:
                present = sorted(f.keys())
                for key in keys:
                    if key in present:
                        out[key] = np.asarray(f.get_tensor(key))
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise ValueError(f"{what} file {str(p)!r} is not a readable safetensors file: {err}") from None
    else:
        raise ValueError(f"{what} file {str(p)!r} must be a .safetensors or .npz file")
    missing = [key for key in keys if key not in out and key not in optional]
    if missing:
        why = (needed_for or {}).get(missing[0])
        raise ValueError(
            f"{what} file {str(p)!r} has no {missing[0]!r} tensor ({'' if why is None else f'needed for {why}; '}"
            f"keys: {present})"
        )
    floating = lambda a: np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"  # noqa: E731
    return {key: a.astype(np.float32) if floating(a) else a for key, a in out.items()}


def _as_batch1(name: str, arr: np.ndarray, path: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(
            f"prompt embeddings {path!r}: {name!r} must have shape [T, text_dim] or [1, T, text_dim], "
            f"got {list(arr.shape)}"
        )
    if not np.issubdtype(arr.dtype, np.floating) and str(arr.dtype) != "bfloat16":
        raise ValueError(f"prompt embeddings {path!r}: {name!r} must be floating point, got {arr.dtype}")
    arr = np.asarray(arr, np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"prompt embeddings {path!r}: {name!r} holds non-finite values")
    return arr


def load_prompt_embeds(
    path: str | os.PathLike, *, text_dim: int | None = None, require_uncond: bool = True
) -> tuple[Float[np.ndarray, "1 t e"], Float[np.ndarray, "1 t e"] | None]:
    """Reads prompt embeddings: ``(cond [1, T, E], uncond [1, T', E] or None)``, float32.

    Args:
      path: a safetensors file (any suffix but ``.npz``) with the keys ``cond`` and ``uncond``
        (any float dtype, bfloat16 included; shapes ``[T, E]`` or ``[1, T, E]``).
      text_dim: the model's ``text_dim`` (4096 for Wan2.1); checked when given.
      require_uncond: raise if ``uncond`` is absent (guidance needs it); otherwise return
        ``None`` for it.

    Raises:
      ValueError: for a missing file or key, a bad shape or dtype, or a ``text_dim`` mismatch.
    """
    p = pathlib.Path(path)
    out = _read_arrays(
        p, PROMPT_KEYS, "prompt embeddings", npz=False,
        optional=() if require_uncond else ("uncond",), needed_for={"uncond": "classifier-free guidance"},
    )  # fmt: skip
    cond = _as_batch1("cond", out["cond"], str(p))
    uncond = _as_batch1("uncond", out["uncond"], str(p)) if "uncond" in out else None
    for name, arr in (("cond", cond), ("uncond", uncond)):
        if arr is not None and text_dim is not None and arr.shape[-1] != text_dim:
            raise ValueError(
                f"prompt embeddings {str(p)!r}: {name!r} has width {arr.shape[-1]}, the model expects "
                f"text_dim={text_dim}"
            )
    if uncond is not None and uncond.shape[-1] != cond.shape[-1]:
        raise ValueError(f"prompt embeddings {str(p)!r}: 'cond' and 'uncond' widths differ")
    return cond, uncond


def save_prompt_embeds(
    path: str | os.PathLike, cond: Any, uncond: Any | None = None
) -> pathlib.Path:
    """Writes ``cond`` (and ``uncond``) as float32 safetensors in the layout
    :func:`load_prompt_embeds` reads (shapes ``[T, E]`` or ``[1, T, E]``), atomically."""
    from safetensors.numpy import save

    tensors = {"cond": np.ascontiguousarray(np.asarray(cond, np.float32))}
    if uncond is not None:
        tensors["uncond"] = np.ascontiguousarray(np.asarray(uncond, np.float32))
    for name, arr in tensors.items():
        _as_batch1(name, arr, str(path))
    return atomic_write_bytes(path, save(tensors))


HUNYUAN_PROMPT_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")


class HunyuanPromptEmbeds(NamedTuple):
    """One HunyuanVideo prompt's text-encoder outputs (NumPy).

    Attributes:
      prompt_embeds: float32 ``[T, text_dim]`` (LLaVA-Llama-3, the pipeline's 256 tokens).
      prompt_attention_mask: int32 ``[T]``, ones then zeros (at least one 1).
      pooled_prompt_embeds: float32 ``[pooled_dim]`` (CLIP-L's pooled output).
    """

    prompt_embeds: Float[np.ndarray, "t e"]
    prompt_attention_mask: Int[np.ndarray, " t"]
    pooled_prompt_embeds: Float[np.ndarray, " p"]


def _drop_batch1(arr: np.ndarray, rank: int) -> np.ndarray:
    return arr[0] if arr.ndim == rank + 1 and arr.shape[0] == 1 else arr


def load_hunyuan_prompt_embeds(
    path: str | os.PathLike, *, text_dim: int | None = None, pooled_dim: int | None = None
) -> HunyuanPromptEmbeds:
    """Reads a HunyuanVideo prompt file (``.safetensors`` or ``.npz``).

    Args:
      path: the file, with ``prompt_embeds [T, text_dim]``, ``prompt_attention_mask [T]`` and
        ``pooled_prompt_embeds [pooled_dim]`` (each may carry a leading batch axis of 1; any
        float dtype, bfloat16 included; the mask integer or bool).
      text_dim, pooled_dim: the model's widths (4096 and 768 for the 13B model), checked when given.

    Raises:
      ValueError: one line naming the file, the key and the expected shape or value: a missing
        file or key, a bad shape or dtype, a width mismatch, non-finite values, or a mask that
        is not 0/1 ones-then-zeros with at least one valid token.
    """
    p = pathlib.Path(path)
    what = "prompt embeddings"
    raw = _read_arrays(p, HUNYUAN_PROMPT_KEYS, what)
    embeds = _drop_batch1(raw["prompt_embeds"], 2)
    mask = _drop_batch1(raw["prompt_attention_mask"], 1)
    pooled = _drop_batch1(raw["pooled_prompt_embeds"], 1)
    where = f"{what} {str(p)!r}"
    e = "text_dim" if text_dim is None else str(text_dim)
    if embeds.ndim != 2 or min(embeds.shape) < 1 or (text_dim is not None and embeds.shape[1] != text_dim):
        raise ValueError(f"{where}: 'prompt_embeds' must have shape [T, {e}], got {list(embeds.shape)}")
    length = embeds.shape[0]
    if mask.shape != (length,):
        raise ValueError(
            f"{where}: 'prompt_attention_mask' must have shape [T={length}] (the length of prompt_embeds), "
            f"got {list(mask.shape)}"
        )
    pd = "pooled_dim" if pooled_dim is None else str(pooled_dim)
    if pooled.ndim != 1 or pooled.shape[0] < 1 or (pooled_dim is not None and pooled.shape[0] != pooled_dim):
        raise ValueError(f"{where}: 'pooled_prompt_embeds' must have shape [{pd}], got {list(pooled.shape)}")
    for name, arr in (("prompt_embeds", embeds), ("pooled_prompt_embeds", pooled)):
        if arr.dtype != np.float32:
            raise ValueError(f"{where}: {name!r} must be floating point, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: {name!r} holds non-finite values")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"{where}: 'prompt_attention_mask' must be integer or bool (1 = valid), got {mask.dtype}")
    mask = mask.astype(np.int64)
    valid = int(mask.sum())
    if not np.isin(mask, (0, 1)).all() or valid < 1 or not (mask[:valid] == 1).all():
        raise ValueError(
            f"{where}: 'prompt_attention_mask' must be 1 for the valid tokens then 0 (right-padded, at least "
            f"one valid token), got {mask.tolist()[:8]}{'...' if length > 8 else ''} with {valid} ones"
        )
    return HunyuanPromptEmbeds(embeds, mask.astype(np.int32), pooled)


def save_hunyuan_prompt_embeds(
    path: str | os.PathLike, prompt_embeds: Any, prompt_attention_mask: Any, pooled_prompt_embeds: Any
) -> pathlib.Path:
    """Writes a HunyuanVideo prompt file that :func:`load_hunyuan_prompt_embeds` reads, atomically:
    float32 embeddings and an int32 mask, as ``.safetensors`` or ``.npz`` (by the suffix)."""
    import io

    p = pathlib.Path(path)
    tensors = {
        "prompt_embeds": np.ascontiguousarray(np.asarray(prompt_embeds, np.float32)),
        "prompt_attention_mask": np.ascontiguousarray(np.asarray(prompt_attention_mask).astype(np.int32)),
        "pooled_prompt_embeds": np.ascontiguousarray(np.asarray(pooled_prompt_embeds, np.float32)),
    }
    if p.suffix == ".safetensors":
        from safetensors.numpy import save

        return atomic_write_bytes(p, save(tensors))
    if p.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, **tensors)
        return atomic_write_bytes(p, buffer.getvalue())
    raise ValueError(f"prompt embeddings file {str(p)!r} must be a .safetensors or .npz file")


def save_latents(
    path: str | os.PathLike, latents: Any, metadata: Mapping[str, Any] | None = None
) -> pathlib.Path:
    """Writes latents ``[B, C, F, H, W]`` as float32 safetensors (key ``latents``).

    ``metadata`` values are stored as strings (e.g. the config name, steps, seed, backend).
    The file is serialized in memory and written atomically (:func:`atomic_write_bytes`): a
    kill during an overwrite leaves the old file intact. Missing parent folders are created.

    Raises:
      ValueError: if ``latents`` is not 5-D or holds non-finite values.
    """
    from safetensors.numpy import save

    arr = np.asarray(latents, dtype=np.float32)
    if arr.ndim != 5:
        raise ValueError(f"latents must have shape [B, C, F, H, W], got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("latents hold non-finite values")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save({LATENTS_KEY: np.ascontiguousarray(arr)}, metadata=meta or None)
    return atomic_write_bytes(path, data)


def load_latents(path: str | os.PathLike) -> tuple[Float[np.ndarray, "b c f h w"], dict[str, str]]:
    """Reads latents written by :func:`save_latents`: ``(latents float32, metadata)``.

    Raises:
      ValueError: for a missing file or a file without a 5-D ``latents`` tensor.
    """
    from safetensors import safe_open

    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"latents file {str(p)!r} does not exist")
    with safe_open(str(p), framework="np") as f:
        if LATENTS_KEY not in f.keys():
            raise ValueError(f"latents file {str(p)!r} has no {LATENTS_KEY!r} tensor")
        arr = f.get_tensor(LATENTS_KEY)
        meta = dict(f.metadata() or {})
    if arr.ndim != 5:
        raise ValueError(f"latents file {str(p)!r}: expected shape [B, C, F, H, W], got {list(arr.shape)}")
    return np.asarray(arr, np.float32), meta


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"decoding latents to MP4 needs the optional VAE extra ({name!r} is not installed: {err}). "
            f"Install it with: {VAE_EXTRA_HINT}"
        ) from err


def _vae_location(vae_path: str | os.PathLike) -> tuple[str, str | None]:
    """``(path, subfolder)`` for ``from_pretrained``: a checkpoint root with a ``vae/`` folder, or
    the VAE folder itself (:func:`models.common.files.component_folder`)."""
    try:
        root, subfolder = component_folder(vae_path, "vae", "VAE")
    except ValueError as err:
        raise ValueError(f"vae_path {err}") from None
    return str(root), subfolder


class _VaeRecipe(NamedTuple):
    """How a model family's pipeline decodes its latents (diffusers' classes, read lazily)."""

    vae_class: str
    fps: int
    tiling: bool  # enable_tiling(): HunyuanVideo's 720p videos need it


#: What each family's diffusers pipeline does after sampling (see :func:`decode_to_mp4`).
VAE_RECIPES: dict[str, _VaeRecipe] = {
    "wan2.1": _VaeRecipe("AutoencoderKLWan", 16, False),
    "hunyuan-video": _VaeRecipe("AutoencoderKLHunyuanVideo", 24, True),
}


def _unnormalize(model: str, z, vae, torch, dtype, dev):
    """The latents as the VAE decodes them: Wan ``z * std + mean`` (per channel, from the VAE
    config), HunyuanVideo ``z / scaling_factor`` (0.476986)."""
    if model == "wan2.1":
        mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=dev).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=dtype, device=dev).view(1, -1, 1, 1, 1)
        return z * std + mean
    return z / vae.config.scaling_factor


def decode_to_mp4(
    latents: Any,
    vae_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model: str = "wan2.1",
    fps: int | None = None,
    device: str | None = None,
    torch_dtype: str = "float32",
) -> pathlib.Path:
    """Decodes latents with the family's diffusers VAE and writes an MP4 (optional extra).

    Does what the diffusers pipeline does after sampling, then maps ``[-1, 1]`` to ``[0, 1]``
    frames and writes them with ``diffusers.utils.export_to_video``; only the first video of the
    batch is written:

    - ``"wan2.1"`` (``WanPipeline``): ``AutoencoderKLWan``, ``latents * std + mean`` with the VAE
      config's per-channel ``latents_std``/``latents_mean``; 16 fps;
    - ``"hunyuan-video"`` (``HunyuanVideoPipeline``): ``AutoencoderKLHunyuanVideo`` with tiling,
      ``latents / scaling_factor``; 24 fps.

    Args:
      latents: ``[B, 16, F, H, W]`` (NumPy or JAX array).
      vae_path: the diffusers checkpoint root (with ``vae/``) or the VAE folder.
      out_path: the ``.mp4`` to write.
      model: the model family (:data:`VAE_RECIPES`).
      fps: frames per second (default: the family's).
      device: torch device (default: ``"cuda"`` when available, else ``"cpu"``).
      torch_dtype: the VAE's dtype name (``"float32"`` as in diffusers' examples).

    Raises:
      ImportError: when torch / diffusers / imageio are missing, saying what to install.
      ValueError: for a bad latent shape, an unknown ``model`` or a ``vae_path`` without a VAE.
    """
    if model not in VAE_RECIPES:
        raise ValueError(f"model must be one of {tuple(VAE_RECIPES)}, got {model!r}")
    recipe = VAE_RECIPES[model]
    fps = recipe.fps if fps is None else fps
    arr = np.asarray(latents, dtype=np.float32)
    if arr.ndim != 5:
        raise ValueError(f"latents must have shape [B, C, F, H, W], got {list(arr.shape)}")
    location, subfolder = _vae_location(vae_path)
    torch = _import_optional("torch")
    diffusers = _import_optional("diffusers")
    export_utils = _import_optional("diffusers.utils.export_utils")
    _import_optional("imageio")

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, torch_dtype)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    vae_class = getattr(diffusers, recipe.vae_class)
    vae = vae_class.from_pretrained(location, torch_dtype=dtype, **kwargs).to(dev).eval()
    if recipe.tiling:
        vae.enable_tiling()
    channels = getattr(vae.config, "z_dim", None) or getattr(vae.config, "latent_channels", None)
    if arr.shape[1] != channels:
        raise ValueError(f"latents have {arr.shape[1]} channels, the VAE expects {channels}")
    z = torch.from_numpy(arr[:1]).to(dev, dtype)
    with torch.no_grad():
        video = vae.decode(_unnormalize(model, z, vae, torch, dtype, dev), return_dict=False)[0]  # [-1, 1]
    frames = (video[0].float().clamp(-1, 1) / 2 + 0.5).permute(1, 2, 3, 0).cpu().numpy()
    out = pathlib.Path(out_path)
    with atomic_write(out) as tmp:  # keeps the .mp4 suffix, which export_to_video relies on
        export_utils.export_to_video(list(frames), str(tmp), fps=fps)
    return out
