"""The Wan VAE decode's progress: one report per decoded chunk of each tile, from inside the jit
program, as many as :func:`models.vae.decode_ticks` says; the frames the same (to float32 rounding) with and
without a bar; one compile per bar kept (fixture: ``tests/fixtures/wan_vae_tiny``, as in
test_wan_vae.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES
from safetensors.numpy import load_file

from models.common.progress import TickBar
from models.vae import WanVAE, WanVAETiling, decode_ticks, decode_video, load_wan_vae

FIXTURE = FIXTURES / "wan_vae_tiny"
TILING = WanVAETiling(**json.loads((FIXTURE / "metadata.json").read_text())["tiling"])
# Latent tiles of 2 x 2 with stride 1: on a 1 x 3 latent, 1 x 3 tiles of two shapes (the two
# 1 x 2 ones run by one lax.map, then a 1 x 1 one). With chunk_size=2 on three latent frames each
# tile's scan has one step, which XLA inlines when no callback is in it: the 1 x 1 tile's frames
# then differ in the last bit from a decode with a bar (hence the comparison to float32 rounding).
SMALL_TILES = WanVAETiling(16, 16, 8, 8)


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return load_wan_vae(FIXTURE, dtype=jnp.float32)


@pytest.mark.parametrize(
    "shape, tiling, chunk_size, ticks",
    [
        ((2, 16, 3, 2, 3), None, 1, 3),  # frame 0, then 2 chunks of 1
        ((2, 16, 3, 2, 3), None, 2, 2),
        ((2, 16, 3, 2, 3), None, None, 1),  # one pass
        ((2, 16, 1, 2, 3), None, 1, 1),  # frame 0 alone
        ((1, 16, 3, 4, 8), TILING, 1, 18),  # 2 x 3 tiles
        ((1, 16, 3, 4, 8), TILING, None, 6),
        ((1, 16, 3, 4, 5), TILING, 1, 3),  # 4 x 5 latents = 32 x 40 pixels: the tile size, not tiled
        ((1, 16, 21, 60, 104), WanVAETiling(), 1, 315),  # Wan 480p, 81 frames: 3 x 5 tiles of 21
        ((1, 16, 21, 60, 104), WanVAETiling(), 4, 90),
        ((1, 16, 21, 60, 104), None, 5, 5),
    ],
)
def test_decode_ticks_arithmetic(shape, tiling, chunk_size, ticks):
    assert decode_ticks(shape, tiling, chunk_size) == ticks


def test_decode_ticks_needs_a_latent_shape():
    with pytest.raises(ValueError, match=r"latent_shape must be \[B, z_dim, F, h, w\]"):
        decode_ticks((16, 3, 2, 3))


def _with_and_without_bar(vae, latents, tiling, chunk_size) -> TickBar:
    """Decodes with a bar and without; returns the bar.

    The frames are the same arithmetic; only XLA's fusion may differ (a one-step scan with a host
    callback stays a loop), so they agree to a few float32 ulps of their [-1, 1] range."""
    bar = TickBar("decode", show=False)
    bar.open(decode_ticks(latents.shape, tiling, chunk_size, spatial_factor=vae.config.spatial_factor))
    with_bar = decode_video(vae, latents, tiling=tiling, chunk_size=chunk_size, progress=bar.tick)
    without = decode_video(vae, latents, tiling=tiling, chunk_size=chunk_size)
    jax.effects_barrier()
    np.testing.assert_allclose(np.asarray(with_bar), np.asarray(without), rtol=0, atol=8 * np.finfo(np.float32).eps)
    return bar


@pytest.mark.parametrize("chunk_size", [1, 2, None], ids=["chunks_of_1", "chunks_of_2", "one_pass"])
def test_untiled_decode_ticks_each_chunk(vae, io, chunk_size):
    bar = _with_and_without_bar(vae, jnp.asarray(io["latents"]), None, chunk_size)
    assert bar.count == bar.total == {1: 3, 2: 2, None: 1}[chunk_size]


@pytest.mark.parametrize("chunk_size, ticks", [(2, 6), (1, 9)], ids=["one_step_scans", "chunks_of_1"])
def test_tiled_decode_ticks_each_chunk_of_each_tile(vae, io, chunk_size, ticks):
    latents = jnp.asarray(io["latents"][:1, :, :, :1])  # [1, 16, 3, 1, 3]
    bar = _with_and_without_bar(vae, latents, SMALL_TILES, chunk_size)
    assert bar.count == bar.total == ticks


def test_a_second_decode_with_the_same_bar_does_not_retrace(vae, io, monkeypatch):
    traces = []
    decode = WanVAE.decode

    def counted(self, *args, **kwargs):
        traces.append(1)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(WanVAE, "decode", counted)
    latents = jnp.asarray(io["latents"][:1, :, :1])
    bar = TickBar("decode", show=False)
    for run in range(2):
        bar.open(1)
        decode_video(vae, latents, progress=bar.tick).block_until_ready()
        jax.effects_barrier()
        assert bar.count == 1 and len(traces) == 1, f"run {run}: traced {len(traces)} times"
    other = TickBar("decode", show=False)  # another bar is another program
    decode_video(vae, latents, progress=other.tick).block_until_ready()
    assert len(traces) == 2


def test_decode_frames_without_a_cpu_device_fills_the_bar_at_the_end(vae, io, monkeypatch):
    # No CPU device for callbacks (JAX_PLATFORMS=cuda): the decode runs without them and the
    # bar is filled once it is done.
    from models.pipelines import wan

    latents = jnp.asarray(io["latents"])
    want = wan.decode_frames(vae, latents)
    monkeypatch.setattr(wan, "host_callbacks_available", lambda: False)
    bar = TickBar("decode", show=False)
    got = wan.decode_frames(vae, latents, bar=bar)
    np.testing.assert_array_equal(got, want)
    assert bar.count == bar.total == decode_ticks(latents.shape, spatial_factor=vae.config.spatial_factor) > 1
