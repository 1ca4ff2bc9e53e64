"""Files of a real Wan run (models.io): prompt embeddings, latents, the optional VAE extra."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from models.io import (
    VAE_EXTRA_HINT,
    decode_to_mp4,
    load_latents,
    load_prompt_embeds,
    save_latents,
    save_prompt_embeds,
)


def test_prompt_embeds_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((12, 48)).astype(np.float32)
    uncond = rng.standard_normal((1, 12, 48)).astype(np.float32)
    path = save_prompt_embeds(tmp_path / "p.safetensors", cond, uncond)
    c, u = load_prompt_embeds(path, text_dim=48)
    np.testing.assert_array_equal(c, cond[None])
    np.testing.assert_array_equal(u, uncond)
    with pytest.raises(ValueError, match="text_dim=4096"):
        load_prompt_embeds(path, text_dim=4096)
    only = save_prompt_embeds(tmp_path / "c.safetensors", cond)
    with pytest.raises(ValueError, match="'uncond'"):
        load_prompt_embeds(only)
    c2, u2 = load_prompt_embeds(only, require_uncond=False)
    assert u2 is None
    np.testing.assert_array_equal(c2, cond[None])


def test_prompt_embeds_bfloat16_file(tmp_path):
    """Embeddings saved in bfloat16 by PyTorch (safetensors dtype BF16) load as float32."""
    import jax.numpy as jnp
    import ml_dtypes
    from safetensors.flax import save_file as save_flax

    rng = np.random.default_rng(1)
    cond = rng.standard_normal((1, 7, 16)).astype(ml_dtypes.bfloat16)
    uncond = rng.standard_normal((1, 7, 16)).astype(ml_dtypes.bfloat16)
    save_flax({"cond": jnp.asarray(cond), "uncond": jnp.asarray(uncond)}, str(tmp_path / "bf16.safetensors"))
    c, u = load_prompt_embeds(tmp_path / "bf16.safetensors", text_dim=16)
    assert c.dtype == np.float32
    np.testing.assert_array_equal(c, cond.astype(np.float32))
    np.testing.assert_array_equal(u, uncond.astype(np.float32))


def test_prompt_embeds_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_embeds(tmp_path / "none.safetensors")
    rng = np.random.default_rng(2)
    save_file({"text": rng.standard_normal((3, 4)).astype(np.float32)}, tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match="no 'cond'"):
        load_prompt_embeds(tmp_path / "k.safetensors")
    save_file(
        {"cond": rng.standard_normal((2, 3, 4)).astype(np.float32), "uncond": rng.standard_normal((3, 4)).astype(np.float32)},
        tmp_path / "b.safetensors",
    )
    with pytest.raises(ValueError, match=r"'cond' must have shape \[T, text_dim\]"):
        load_prompt_embeds(tmp_path / "b.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_prompt_embeds(tmp_path / "junk.safetensors")
    needed = r"no 'uncond' tensor \(needed for classifier-free guidance; keys: \['cond'\]\)"
    with pytest.raises(ValueError, match=needed):
        load_prompt_embeds(save_prompt_embeds(tmp_path / "c.safetensors", rng.standard_normal((3, 4))))
    np.savez(tmp_path / "p.npz", cond=rng.standard_normal((3, 4)), uncond=rng.standard_normal((3, 4)))
    with pytest.raises(ValueError, match=r"p\.npz' must be a safetensors file, got a \.npz file"):
        load_prompt_embeds(tmp_path / "p.npz")
    save_file({"cond": rng.integers(0, 9, (3, 4)).astype(np.int32)}, tmp_path / "i.safetensors")
    with pytest.raises(ValueError, match="'cond' must be floating point, got int32"):
        load_prompt_embeds(tmp_path / "i.safetensors", require_uncond=False)


def test_prompt_embeds_float64_and_any_suffix(tmp_path):
    """A float64 file loads as float32 (rounded once); a safetensors file of any other name than
    ``.npz`` reads as safetensors."""
    rng = np.random.default_rng(4)
    cond, uncond = rng.standard_normal((5, 8)), rng.standard_normal((1, 5, 8))
    save_file({"cond": cond, "uncond": uncond}, tmp_path / "p.bin")
    c, u = load_prompt_embeds(tmp_path / "p.bin", text_dim=8)
    assert c.dtype == u.dtype == np.float32
    np.testing.assert_array_equal(c, cond[None].astype(np.float32))
    np.testing.assert_array_equal(u, uncond.astype(np.float32))


def test_latents_roundtrip(tmp_path):
    lat = np.random.default_rng(3).standard_normal((1, 16, 3, 8, 10)).astype(np.float32)
    path = save_latents(tmp_path / "lat.safetensors", lat, {"steps": 50, "backend": "dfs"})
    got, meta = load_latents(path)
    np.testing.assert_array_equal(got, lat)
    assert meta == {"steps": "50", "backend": "dfs"}
    with pytest.raises(ValueError, match="latents must have shape"):
        save_latents(tmp_path / "x.safetensors", lat[0])
    with pytest.raises(ValueError, match="non-finite"):
        save_latents(tmp_path / "x.safetensors", np.full((1, 1, 1, 1, 1), np.nan, np.float32))


def test_decode_without_extra_says_what_to_install(tmp_path, monkeypatch):
    """Without torch/diffusers, decoding fails with an ImportError naming the extra to install."""
    vae = tmp_path / "ckpt" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    lat = np.random.default_rng(4).standard_normal((1, 16, 2, 4, 4)).astype(np.float32)
    with pytest.raises(ImportError, match="optional VAE extra") as err:
        decode_to_mp4(lat, tmp_path / "ckpt", tmp_path / "v.mp4")
    assert VAE_EXTRA_HINT in str(err.value)


def test_decode_bad_arguments(tmp_path):
    lat = np.random.default_rng(5).standard_normal((1, 16, 2, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="holds no diffusers VAE"):
        decode_to_mp4(lat, tmp_path, tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="latents must have shape"):
        decode_to_mp4(lat[0], tmp_path, tmp_path / "v.mp4")
