"""Files around a real Wan2.1 run: prompt embeddings in, latents out, optional MP4 via the VAE.

* :func:`load_prompt_embeds` reads the text-encoder output the user made with their own UMT5
  (see the README section "Using real Wan2.1 weights"): a safetensors file with ``cond`` and
  (for classifier-free guidance) ``uncond``, each ``[T, text_dim]`` or ``[1, T, text_dim]``.
* :func:`save_latents` / :func:`load_latents` write and read the final latents
  ``[B, C, F, H, W]`` as float32 safetensors (key ``latents``, plus string metadata).
* :func:`decode_to_mp4` decodes latents with diffusers' ``AutoencoderKLWan`` and writes an MP4.
  It needs the optional extra (``torch``, ``diffusers``, ``imageio``, ``imageio-ffmpeg``),
  imported lazily: without them it raises an ``ImportError`` that says what to install.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from typing import Any, Mapping

import numpy as np
from jaxtyping import Float

__all__ = [
    "PROMPT_KEYS",
    "LATENTS_KEY",
    "VAE_EXTRA_HINT",
    "load_prompt_embeds",
    "save_prompt_embeds",
    "save_latents",
    "load_latents",
    "decode_to_mp4",
]

PROMPT_KEYS = ("cond", "uncond")
LATENTS_KEY = "latents"
VAE_EXTRA_HINT = "pip install torch diffusers transformers accelerate imageio imageio-ffmpeg"


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
      path: a safetensors file with the keys ``cond`` and ``uncond`` (any float dtype,
        bfloat16 included; shapes ``[T, E]`` or ``[1, T, E]``).
      text_dim: the model's ``text_dim`` (4096 for Wan2.1); checked when given.
      require_uncond: raise if ``uncond`` is absent (guidance needs it); otherwise return
        ``None`` for it.

    Raises:
      ValueError: for a missing file or key, a bad shape or dtype, or a ``text_dim`` mismatch.
    """
    from safetensors import safe_open

    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"prompt embeddings file {str(p)!r} does not exist")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(p), framework="flax") as f:
            keys = set(f.keys())
            for key in PROMPT_KEYS:
                if key in keys:
                    out[key] = np.asarray(f.get_tensor(key).astype("float32"))
    except Exception as err:  # safetensors raises its own error types for a corrupt file
        raise ValueError(f"prompt embeddings file {str(p)!r} is not a readable safetensors file: {err}") from None
    if "cond" not in out:
        raise ValueError(f"prompt embeddings file {str(p)!r} has no 'cond' tensor (keys: {sorted(keys)})")
    if require_uncond and "uncond" not in out:
        raise ValueError(
            f"prompt embeddings file {str(p)!r} has no 'uncond' tensor (needed for classifier-free guidance; "
            f"keys: {sorted(keys)})"
        )
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
    :func:`load_prompt_embeds` reads (shapes ``[T, E]`` or ``[1, T, E]``)."""
    from safetensors.numpy import save_file

    tensors = {"cond": np.ascontiguousarray(np.asarray(cond, np.float32))}
    if uncond is not None:
        tensors["uncond"] = np.ascontiguousarray(np.asarray(uncond, np.float32))
    for name, arr in tensors.items():
        _as_batch1(name, arr, str(path))
    p = pathlib.Path(path)
    save_file(tensors, str(p))
    return p


def save_latents(
    path: str | os.PathLike, latents: Any, metadata: Mapping[str, Any] | None = None
) -> pathlib.Path:
    """Writes latents ``[B, C, F, H, W]`` as float32 safetensors (key ``latents``).

    ``metadata`` values are stored as strings (e.g. the config name, steps, seed, backend).

    Raises:
      ValueError: if ``latents`` is not 5-D or holds non-finite values.
    """
    from safetensors.numpy import save_file

    arr = np.asarray(latents, dtype=np.float32)
    if arr.ndim != 5:
        raise ValueError(f"latents must have shape [B, C, F, H, W], got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("latents hold non-finite values")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    p = pathlib.Path(path)
    save_file({LATENTS_KEY: np.ascontiguousarray(arr)}, str(p), metadata=meta or None)
    return p


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
    """``(path, subfolder)`` for ``AutoencoderKLWan.from_pretrained``: a checkpoint root with a
    ``vae/`` folder, or the VAE folder itself."""
    p = pathlib.Path(vae_path)
    if (p / "vae" / "config.json").is_file():
        return str(p), "vae"
    if (p / "config.json").is_file():
        return str(p), None
    raise ValueError(f"vae_path {str(p)!r} holds no diffusers VAE (no config.json in it or in its vae/ folder)")


def decode_to_mp4(
    latents: Any,
    vae_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    fps: int = 16,
    device: str | None = None,
    torch_dtype: str = "float32",
) -> pathlib.Path:
    """Decodes Wan latents with diffusers' ``AutoencoderKLWan`` and writes an MP4 (optional extra).

    Does what diffusers' ``WanPipeline`` does after sampling: ``latents * std + mean`` with the
    VAE config's per-channel ``latents_std``/``latents_mean``, ``vae.decode``, then maps
    ``[-1, 1]`` to ``[0, 1]`` frames and writes them with ``diffusers.utils.export_to_video``.
    Only the first video of the batch is written.

    Args:
      latents: ``[B, 16, F, H, W]`` (NumPy or JAX array).
      vae_path: the diffusers checkpoint root (with ``vae/``) or the VAE folder.
      out_path: the ``.mp4`` to write.
      fps: frames per second (Wan2.1 generates 16 fps video).
      device: torch device (default: ``"cuda"`` when available, else ``"cpu"``).
      torch_dtype: the VAE's dtype name (``"float32"`` as in diffusers' Wan examples).

    Raises:
      ImportError: when torch / diffusers / imageio are missing, saying what to install.
      ValueError: for a bad latent shape or a ``vae_path`` without a VAE.
    """
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
    vae = diffusers.AutoencoderKLWan.from_pretrained(location, torch_dtype=dtype, **kwargs).to(dev).eval()
    if arr.shape[1] != vae.config.z_dim:
        raise ValueError(f"latents have {arr.shape[1]} channels, the VAE expects z_dim={vae.config.z_dim}")
    z = torch.from_numpy(arr[:1]).to(dev, dtype)
    mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=dtype, device=dev).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(z * std + mean, return_dict=False)[0]  # [1, 3, frames, H, W] in [-1, 1]
    frames = (video[0].float().clamp(-1, 1) / 2 + 0.5).permute(1, 2, 3, 0).cpu().numpy()
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_utils.export_to_video(list(frames), str(out), fps=fps)
    return out
