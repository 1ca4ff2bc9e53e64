"""The photographs the harness clips are made of: scikit-image's bundled sample images (no network).

A clip (:mod:`models.evaluation.clips`) is a camera moving over one *background* photo, with
sprites textured from the others. :func:`load_photo_bank` loads them once as square float32
images in [-1, 1].
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np
from jaxtyping import Float

__all__ = ["BACKGROUND_PHOTOS", "SPRITE_PHOTOS", "PhotoBank", "load_photo_bank"]

#: Background photos (the "source" of a clip), all bundled in the scikit-image wheel.
BACKGROUND_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle",
)
#: Extra photos used only as sprite textures (sprites also take textures from the other backgrounds).
SPRITE_PHOTOS: tuple[str, ...] = ("coins", "colorwheel", "moon", "brick")


class PhotoBank(NamedTuple):
    """The photographs, centre-cropped to squares and resized.

    Attributes:
      images: float32[P, S, S, 3] in [-1, 1]; the first ``len(BACKGROUND_PHOTOS)`` are the backgrounds
        (in :data:`BACKGROUND_PHOTOS` order), the rest sprite-only textures.
      names: the P photo names.
    """

    images: Float[np.ndarray, "p s s 3"]
    names: tuple[str, ...]


def _load_photo(name: str) -> np.ndarray:
    """One bundled photograph as uint8 [h, w, 3] (grey images are replicated to RGB)."""
    import skimage.data  # imported lazily: only the bank needs scikit-image

    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def _square_photo(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square, resizes (anti-aliased) to ``size`` and maps to [-1, 1]."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side].astype(np.float64) / 255.0
    out = resize(crop, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    return np.clip(out * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def load_photo_bank(size: int = 256) -> PhotoBank:
    """Loads the bundled photographs into a :class:`PhotoBank` of ``size × size`` squares.

    Uses only images shipped inside the scikit-image wheel (no network). Load it once and pass it
    to :func:`render_clips` / :func:`make_clips` (about 0.1 s).
    """
    size = operator.index(size)
    if size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size}")
    names = BACKGROUND_PHOTOS + SPRITE_PHOTOS
    images = np.stack([_square_photo(_load_photo(n), size) for n in names])
    return PhotoBank(images=images, names=names)
