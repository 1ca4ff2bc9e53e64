"""Image to video with Wan2.2 I2V-A14B in JAX alone: :class:`WanImageToVideoPipeline`, diffusers'
``WanImageToVideoPipeline`` without PyTorch and without CLIP (the A14B experts take no image
embedding; Wan2.1's I2V transformers, which do, are refused when their config is read).

    pipe = WanImageToVideoPipeline.from_pretrained("Wan2.2-I2V-A14B-Diffusers")
    out = pipe(image, "A cat walks on the grass, realistic", height=480, width=832, seed=0)

The transformer takes 36 latent channels: the noise (16), a mask (4) and the image's latents (16)
(diffusers 0.42.1 ``pipeline_wan_i2v.py`` ``prepare_latents``). :func:`image_condition` computes
the last two once: the image followed by ``num_frames - 1`` zero frames, encoded by the VAE (the
posterior's mode) and normalized with the latent statistics; the mask is 1 on the first latent
frame (the image's four pixel frames) and 0 after. The sampler appends them to the latents at
every step (:class:`~models.sampling.loop.Sampler`'s ``condition``), with each expert and its
guidance scale as in :mod:`models.pipelines.wan`.

The image is taken as it is: ``[height, width, 3]``, uint8 or floats in [0, 1] (diffusers
resizes a PIL image to the video's size first; resize it before the call).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from models.pipelines.wan import WanPipeline, WanPipelineOutput
from models.text_encoders.prompts import DEFAULT_MAX_SEQUENCE_LENGTH
from models.vae import WanVAE, encode_video, normalize_latents

__all__ = ["WanImageToVideoPipeline", "check_image", "image_condition"]


def check_image(image, height: int, width: int) -> np.ndarray:
    """``image`` as float32 ``[height, width, 3]`` in [-1, 1] (diffusers' ``VideoProcessor``
    arithmetic: ``2 * pixels / 255 - 1``), after checking its shape and values.

    Raises:
      ValueError: naming ``image``: not ``[height, width, 3]``, not uint8 or floating, floats
        outside [0, 1].
    """
    array = np.asarray(image)
    if array.shape != (height, width, 3):
        raise ValueError(
            f"image must be [height, width, 3] = [{height}, {width}, 3] (resize it to the video's size), "
            f"got shape {list(array.shape)}"
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("image must hold values in [0, 1] when floating point")
    else:
        raise ValueError(f"image must be uint8 or floating point, got {array.dtype}")
    return array * np.float32(2.0) - np.float32(1.0)


def image_condition(
    vae: WanVAE, pixels: Float[np.ndarray, "h w 3"], shape: tuple[int, ...]
) -> Float[Array, "b c2 f h2 w2"]:
    """The channels the I2V transformer takes after the noise's, for latents of ``shape``
    ``[B, z, f, h, w]``: the mask ``[B, 4, f, h, w]`` (1 on the first latent frame) and the
    normalized VAE mode of the image then ``4 (f - 1)`` zero frames ``[B, z, f, h, w]``, float32."""
    batch, _, frames, _, _ = shape
    temporal = vae.config.temporal_factor
    image = jnp.moveaxis(jnp.asarray(pixels), -1, 0)[None, :, None]  # [1, 3, 1, H, W]
    video = jnp.concatenate([image, jnp.zeros(image.shape[:2] + (temporal * (frames - 1),) + image.shape[3:])], axis=2)
    latents = encode_video(vae, video.astype(vae.dtype)).mode()
    latents = normalize_latents(latents.astype(jnp.float32), vae.config)
    mask = jnp.zeros((1, temporal) + latents.shape[2:], jnp.float32).at[:, :, 0].set(1.0)
    return jnp.repeat(jnp.concatenate([mask, latents], axis=1), batch, axis=0)


class WanImageToVideoPipeline(WanPipeline):
    """Wan2.2 I2V-A14B: an image and a prompt in, frames out (see the module docstring). Built
    with :meth:`~WanPipeline.from_pretrained` from a diffusers ``WanImageToVideoPipeline``
    repository; everything else is :class:`WanPipeline`'s."""

    PIPELINE_CLASS = "WanImageToVideoPipeline"
    IMAGE_TO_VIDEO = True

    def __call__(
        self,
        image: np.ndarray,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        latents: Float[Array, "b c f h w"] | np.ndarray | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        output_type: str = "np",
        seed: int | None = None,
    ) -> WanPipelineOutput:
        """A video per prompt starting from ``image`` ``[height, width, 3]`` (uint8, or floats in
        [0, 1]; :func:`check_image`); the other arguments as :meth:`WanPipeline.__call__`.

        Raises:
          ValueError: naming the argument, before any work.
        """
        pixels = check_image(image, height, width)
        return self._generate(
            prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, guidance_scale_2,
            num_videos_per_prompt, latents, max_sequence_length, output_type, seed,
            condition=lambda shape: image_condition(self.vae, pixels, shape),
        )  # fmt: skip
