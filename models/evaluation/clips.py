"""Synthetic video clips with real content, made on the fly from scikit-image's bundled photographs.

No pretrained video model can be downloaded here, so the quality harness trains a small video
DiT on clips rendered from the sample photographs that ship inside the scikit-image wheel (no
network access at any point: only images stored in the wheel are used). A clip is a virtual
camera moving over one *background* photo, plus soft-edged elliptical *sprites* textured with
crops of *other* photos that move across the frame and occlude each other.

Motion classes (:data:`MOTIONS`):

* ``pan``: the camera translates at constant velocity in a random direction;
* ``zoom_in`` / ``zoom_out``: the view window shrinks / grows geometrically about a fixed centre;
* ``rotate``: the camera rotates about the window centre;
* ``sprites``: static camera, two or three sprites crossing the frame (and each other).

In the camera classes a single sprite appears with probability 0.3. The class label of a clip is
``photo * len(MOTIONS) + motion`` (:func:`class_label`): 8 background photos × 5 motions = 40
classes.

Pipeline: :func:`sample_clip_params` draws every random quantity of a batch of clips with NumPy
from a seed (bitwise reproducible), and :func:`render_clips` renders them with ``jax.numpy``
(bilinear sampling, ``supersample``² samples per pixel, jit-able, so training renders its data
on the accelerator). :func:`make_clips` / :func:`make_clip` wrap both.

The photographs are :mod:`models.evaluation.photos`' (its names are re-exported here); the pixels ↔
latent map and the token grid the DiT sees are in :mod:`models.evaluation.codec`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_int_fields, check_positive_int
from models.evaluation.photos import BACKGROUND_PHOTOS, SPRITE_PHOTOS, PhotoBank, load_photo_bank

__all__ = [
    "BACKGROUND_PHOTOS",
    "SPRITE_PHOTOS",
    "MOTIONS",
    "NUM_PHOTOS",
    "NUM_MOTIONS",
    "NUM_CLASSES",
    "ClipConfig",
    "PhotoBank",
    "ClipParams",
    "Clips",
    "load_photo_bank",
    "class_label",
    "sample_clip_params",
    "render_clips",
    "make_clips",
    "make_clip",
    "clip_classes",
]

MOTIONS: tuple[str, ...] = ("pan", "zoom_in", "zoom_out", "rotate", "sprites")
NUM_PHOTOS = len(BACKGROUND_PHOTOS)
NUM_MOTIONS = len(MOTIONS)
NUM_CLASSES = NUM_PHOTOS * NUM_MOTIONS

_SPRITE_PROBABILITY = 0.3  # chance of one sprite in the camera-motion classes
_EDGE_SOFTNESS = 0.06  # width of a sprite's alpha ramp, in units of its radius


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Size of the rendered clips.

    Attributes:
      frames: number of frames T.
      height, width: frame size in pixels.
      supersample: samples per pixel along each axis (anti-aliasing); rendering happens at
        ``supersample ×`` the resolution and is average-pooled down.
      max_sprites: static number of sprite slots per clip (at least 2; unused slots are transparent).
    """

    frames: int = 16
    height: int = 64
    width: int = 64
    supersample: int = 2
    max_sprites: int = 3

    def __post_init__(self) -> None:
        check_int_fields(self, ("frames", "height", "width", "supersample"))
        if self.frames < 2:
            raise ValueError(f"frames must be at least 2, got {self.frames}")
        if not isinstance(self.max_sprites, (int, np.integer)) or self.max_sprites < 2:
            raise ValueError(f"max_sprites must be an integer >= 2, got {self.max_sprites!r}")

    @property
    def bank_size(self) -> int:
        """Side of the square photos in the bank: 4 × the larger frame side (the view window
        covers about half a photo, so the bank holds ~1 photo pixel per rendered sample)."""
        return 4 * max(self.height, self.width)


class ClipParams(NamedTuple):
    """Every random quantity of a batch of B clips (T frames, S sprite slots).

    Coordinates: photos span [-1, 1] in both axes (x to the right, y down); the screen spans
    [-ax, ax] × [-ay, ay] with ``ax = W / max(H, W)``, ``ay = H / max(H, W)``. Screen point p
    shows photo point ``cam_center + cam_scale * R(cam_angle) p``.

    Attributes:
      photo: int32[B] background photo index.
      motion: int32[B] motion class index.
      cam_center: float32[B, T, 2] window centre in photo coordinates.
      cam_scale: float32[B, T] photo units per screen unit.
      cam_angle: float32[B, T] camera rotation in radians.
      sprite_photo: int32[B, S] texture photo of each sprite (never the background).
      sprite_alpha: float32[B, S] 1 for a visible sprite, 0 for an unused slot.
      sprite_center: float32[B, S, T, 2] sprite centre on screen.
      sprite_radius: float32[B, S, 2] ellipse half-axes (x, y) on screen.
      sprite_tex_center: float32[B, S, 2] texture crop centre in its photo.
      sprite_tex_scale: float32[B, S] texture crop radius in photo units.
      sprite_tex_angle: float32[B, S, T] texture rotation (sprites spin).
    """

    photo: Int[np.ndarray, " b"]
    motion: Int[np.ndarray, " b"]
    cam_center: Float[np.ndarray, "b t 2"]
    cam_scale: Float[np.ndarray, "b t"]
    cam_angle: Float[np.ndarray, "b t"]
    sprite_photo: Int[np.ndarray, "b s"]
    sprite_alpha: Float[np.ndarray, "b s"]
    sprite_center: Float[np.ndarray, "b s t 2"]
    sprite_radius: Float[np.ndarray, "b s 2"]
    sprite_tex_center: Float[np.ndarray, "b s 2"]
    sprite_tex_scale: Float[np.ndarray, "b s"]
    sprite_tex_angle: Float[np.ndarray, "b s t"]


class Clips(NamedTuple):
    """A batch of rendered clips.

    Attributes:
      video: float32[B, T, H, W, 3] in [-1, 1].
      label: int32[B] class label ``photo * NUM_MOTIONS + motion``.
      photo: int32[B] background photo index.
      motion: int32[B] motion class index.
    """

    video: Float[np.ndarray, "b t h w 3"]
    label: Int[np.ndarray, " b"]
    photo: Int[np.ndarray, " b"]
    motion: Int[np.ndarray, " b"]


# ----------------------------------------------------------------------------------------------
# Photo bank


def class_label(photo: int | np.ndarray, motion: int | np.ndarray) -> int | np.ndarray:
    """The class of a clip: ``photo * NUM_MOTIONS + motion``."""
    return photo * NUM_MOTIONS + motion


# ----------------------------------------------------------------------------------------------
# Random parameters (NumPy, bitwise reproducible)


def _screen_extent(config: ClipConfig) -> tuple[float, float]:
    side = max(config.height, config.width)
    return config.width / side, config.height / side


def _feasible_center(rng: np.random.Generator, room_x: float, room_y: float) -> np.ndarray:
    """A uniform point of [-room_x, room_x] × [-room_y, room_y] (rooms clipped at 0)."""
    return np.array([rng.uniform(-1, 1) * max(room_x, 0.0), rng.uniform(-1, 1) * max(room_y, 0.0)])


def _sample_camera(
    rng: np.random.Generator, motion: str, t: np.ndarray, ax: float, ay: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Camera path (centre [T, 2], scale [T], angle [T]) of one clip, kept inside the photo."""
    frames = t.shape[0]
    angle = np.zeros(frames)
    if motion in ("pan", "sprites"):
        scale = rng.uniform(0.4, 0.55) if motion == "pan" else rng.uniform(0.45, 0.65)
        room_x, room_y = 1.0 - scale * ax, 1.0 - scale * ay
        if motion == "pan":
            theta = rng.uniform(0.0, 2.0 * math.pi)
            travel = rng.uniform(0.3, 0.6)
            step = travel * np.array([math.cos(theta), math.sin(theta)])
            step = np.clip(step, [-2.0 * room_x, -2.0 * room_y], [2.0 * room_x, 2.0 * room_y])
            mid = _feasible_center(rng, room_x - abs(step[0]) / 2, room_y - abs(step[1]) / 2)
            center = mid[None, :] + (t[:, None] - 0.5) * step[None, :]
        else:
            center = np.broadcast_to(_feasible_center(rng, room_x, room_y), (frames, 2))
        scale = np.full(frames, scale)
    elif motion in ("zoom_in", "zoom_out"):
        big = rng.uniform(0.6, 0.85)
        ratio = rng.uniform(0.4, 0.6)
        frac = t if motion == "zoom_in" else 1.0 - t
        scale = big * ratio**frac
        center = np.broadcast_to(_feasible_center(rng, 1.0 - big * ax, 1.0 - big * ay), (frames, 2))
    elif motion == "rotate":
        scale_value = rng.uniform(0.35, 0.5)
        reach = scale_value * math.hypot(ax, ay)  # the window's corners stay inside when rotated
        center = np.broadcast_to(_feasible_center(rng, 1.0 - reach, 1.0 - reach), (frames, 2))
        start = rng.uniform(-0.3, 0.3)
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5)
        angle = start + turn * t
        scale = np.full(frames, scale_value)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"unknown motion {motion!r}")
    return np.asarray(center, np.float64), np.asarray(scale, np.float64), angle


def _sample_sprite(rng: np.random.Generator, t: np.ndarray, ax: float, ay: float) -> dict[str, np.ndarray]:
    """One sprite: an ellipse crossing the screen near its centre, with a spinning texture."""
    radius = rng.uniform(0.25, 0.45)
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    start_dir = rng.uniform(0.0, 2.0 * math.pi)
    start = rng.uniform(0.5, 1.0) * np.array([ax * math.cos(start_dir), ay * math.sin(start_dir)])
    bend = rng.uniform(-0.6, 0.6)
    rot = np.array([[math.cos(bend), -math.sin(bend)], [math.sin(bend), math.cos(bend)]])
    end = -rng.uniform(0.6, 1.0) * (rot @ start)
    tex_scale = rng.uniform(0.15, 0.35)
    tex_center = rng.uniform(-1.0, 1.0, size=2) * (1.0 - tex_scale)
    spin0 = rng.uniform(-math.pi, math.pi)
    spin = rng.uniform(-1.0, 1.0)
    return dict(
        center=start[None, :] + t[:, None] * (end - start)[None, :],
        radius=np.array([radius * math.sqrt(aspect), radius / math.sqrt(aspect)]),
        tex_center=tex_center,
        tex_scale=np.float64(tex_scale),
        tex_angle=spin0 + spin * t,
    )


def _check_choice(value: int | None, count: int, name: str) -> None:
    if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < count):
        raise ValueError(f"{name} must be None or an integer in [0, {count}), got {value!r}")


def sample_clip_params(
    seed: int | Sequence[int] | np.random.Generator,
    num_clips: int,
    config: ClipConfig = ClipConfig(),
    *,
    photo: int | None = None,
    motion: int | None = None,
) -> ClipParams:
    """Draws the parameters of ``num_clips`` clips (NumPy; the same seed gives the same bits).

    Args:
      seed: an int, a sequence of ints (e.g. ``(seed, step)``) or a ``np.random.Generator``.
      num_clips: batch size B.
      config: clip size.
      photo: force this background photo index (default: uniform over :data:`BACKGROUND_PHOTOS`).
      motion: force this motion class index (default: uniform over :data:`MOTIONS`).

    Returns:
      A :class:`ClipParams` of NumPy arrays (float32 / int32).
    """
    num_clips = check_positive_int(num_clips, "num_clips")
    _check_choice(photo, NUM_PHOTOS, "photo")
    _check_choice(motion, NUM_MOTIONS, "motion")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    num_textures = NUM_PHOTOS + len(SPRITE_PHOTOS)
    t = np.linspace(0.0, 1.0, config.frames)
    ax, ay = _screen_extent(config)
    fields: dict[str, list[np.ndarray]] = {name: [] for name in ClipParams._fields}
    for _ in range(num_clips):
        p = int(rng.integers(NUM_PHOTOS)) if photo is None else int(photo)
        m = int(rng.integers(NUM_MOTIONS)) if motion is None else int(motion)
        center, scale, angle = _sample_camera(rng, MOTIONS[m], t, ax, ay)
        if MOTIONS[m] == "sprites":
            visible = int(rng.integers(2, config.max_sprites + 1))
        else:
            visible = int(rng.random() < _SPRITE_PROBABILITY)
        sprites = [_sample_sprite(rng, t, ax, ay) for _ in range(config.max_sprites)]
        textures = rng.integers(num_textures - 1, size=config.max_sprites)
        textures = textures + (textures >= p)  # any photo but the background
        fields["photo"].append(np.int32(p))
        fields["motion"].append(np.int32(m))
        fields["cam_center"].append(center)
        fields["cam_scale"].append(scale)
        fields["cam_angle"].append(angle)
        fields["sprite_photo"].append(textures)
        fields["sprite_alpha"].append((np.arange(config.max_sprites) < visible).astype(np.float64))
        fields["sprite_center"].append(np.stack([s["center"] for s in sprites]))
        fields["sprite_radius"].append(np.stack([s["radius"] for s in sprites]))
        fields["sprite_tex_center"].append(np.stack([s["tex_center"] for s in sprites]))
        fields["sprite_tex_scale"].append(np.stack([s["tex_scale"] for s in sprites]))
        fields["sprite_tex_angle"].append(np.stack([s["tex_angle"] for s in sprites]))
    out = {}
    for name, values in fields.items():
        stacked = np.stack(values)
        out[name] = stacked.astype(np.int32 if name in ("photo", "motion", "sprite_photo") else np.float32)
    return ClipParams(**out)


# ----------------------------------------------------------------------------------------------
# Rendering (jax.numpy)


def _bilinear(image: Float[Array, "s s c"], x: Float[Array, "..."], y: Float[Array, "..."]) -> Float[Array, "... c"]:
    """Samples ``image`` at photo coordinates (x, y) in [-1, 1] (edge-clamped)."""
    size = image.shape[0]
    px = jnp.clip((x + 1.0) * (size / 2) - 0.5, 0.0, size - 1.0)
    py = jnp.clip((y + 1.0) * (size / 2) - 0.5, 0.0, size - 1.0)
    x0 = jnp.floor(px).astype(jnp.int32)
    y0 = jnp.floor(py).astype(jnp.int32)
    x1 = jnp.minimum(x0 + 1, size - 1)
    y1 = jnp.minimum(y0 + 1, size - 1)
    wx = (px - x0)[..., None]
    wy = (py - y0)[..., None]
    top = image[y0, x0] * (1.0 - wx) + image[y0, x1] * wx
    bottom = image[y1, x0] * (1.0 - wx) + image[y1, x1] * wx
    return top * (1.0 - wy) + bottom * wy


def _rotate(angle: Float[Array, ""], x: Float[Array, "..."], y: Float[Array, "..."]) -> tuple[Array, Array]:
    c, s = jnp.cos(angle), jnp.sin(angle)
    return c * x - s * y, s * x + c * y


def _render_frame(
    images: Float[Array, "p s s 3"],
    grid_x: Float[Array, "hr wr"],
    grid_y: Float[Array, "hr wr"],
    photo: Int[Array, ""],
    cam_center: Float[Array, "2"],
    cam_scale: Float[Array, ""],
    cam_angle: Float[Array, ""],
    sprite_photo: Int[Array, " s"],
    sprite_alpha: Float[Array, " s"],
    sprite_center: Float[Array, "s 2"],
    sprite_radius: Float[Array, "s 2"],
    sprite_tex_center: Float[Array, "s 2"],
    sprite_tex_scale: Float[Array, " s"],
    sprite_tex_angle: Float[Array, " s"],
) -> Float[Array, "hr wr 3"]:
    rx, ry = _rotate(cam_angle, grid_x, grid_y)
    frame = _bilinear(images[photo], cam_center[0] + cam_scale * rx, cam_center[1] + cam_scale * ry)
    for k in range(sprite_photo.shape[0]):  # static loop; later sprites are in front
        ux = (grid_x - sprite_center[k, 0]) / sprite_radius[k, 0]
        uy = (grid_y - sprite_center[k, 1]) / sprite_radius[k, 1]
        rho = jnp.sqrt(ux * ux + uy * uy)
        alpha = sprite_alpha[k] * jnp.clip((1.0 - rho) / _EDGE_SOFTNESS, 0.0, 1.0)[..., None]
        tx, ty = _rotate(sprite_tex_angle[k], ux, uy)
        texture = _bilinear(
            images[sprite_photo[k]],
            sprite_tex_center[k, 0] + sprite_tex_scale[k] * tx,
            sprite_tex_center[k, 1] + sprite_tex_scale[k] * ty,
        )
        frame = frame * (1.0 - alpha) + texture * alpha
    return frame


def render_clips(
    images: Float[Array, "p s s 3"], params: ClipParams, config: ClipConfig = ClipConfig()
) -> Float[Array, "b t h w 3"]:
    """Renders a batch of clips with ``jax.numpy`` (jit-able with ``config`` static).

    Args:
      images: the bank's photos, float32[P, S, S, 3] in [-1, 1] (``PhotoBank.images``).
      params: the clips' parameters from :func:`sample_clip_params` (NumPy or JAX arrays).
      config: clip size; must match the one ``params`` were sampled with.

    Returns:
      float32[B, T, H, W, 3] in [-1, 1].
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape [P, S, S, 3], got {images.shape}")
    b, t = params.cam_scale.shape
    if t != config.frames or params.sprite_photo.shape[1] != config.max_sprites:
        raise ValueError(
            f"params were sampled for {t} frames and {params.sprite_photo.shape[1]} sprites, "
            f"config has {config.frames} frames and {config.max_sprites} sprites"
        )
    ss = config.supersample
    hr, wr = config.height * ss, config.width * ss
    ax, ay = _screen_extent(config)
    ys = ((jnp.arange(hr, dtype=jnp.float32) + 0.5) / hr * 2.0 - 1.0) * ay
    xs = ((jnp.arange(wr, dtype=jnp.float32) + 0.5) / wr * 2.0 - 1.0) * ax
    grid_x, grid_y = jnp.meshgrid(xs, ys)
    p = jax.tree.map(jnp.asarray, params)

    def one_frame(photo, sprite_photo, sprite_alpha, radius, tex_center, tex_scale, center, scale, angle, s_center, s_angle):
        return _render_frame(
            images, grid_x, grid_y, photo, center, scale, angle,
            sprite_photo, sprite_alpha, s_center, radius, tex_center, tex_scale, s_angle,
        )  # fmt: skip

    per_clip = (p.photo, p.sprite_photo, p.sprite_alpha, p.sprite_radius, p.sprite_tex_center, p.sprite_tex_scale)
    render = jax.vmap(  # over clips
        jax.vmap(  # over frames
            one_frame, in_axes=(None,) * 6 + (0, 0, 0, 1, 1)
        )
    )
    frames = render(
        *per_clip, p.cam_center, p.cam_scale, p.cam_angle, p.sprite_center, p.sprite_tex_angle
    )  # [B, T, hr, wr, 3]
    frames = frames.reshape(b, t, config.height, ss, config.width, ss, 3).mean(axis=(3, 5))
    return jnp.clip(frames, -1.0, 1.0)


def make_clips(
    seed: int | Sequence[int] | np.random.Generator,
    num_clips: int,
    config: ClipConfig = ClipConfig(),
    *,
    bank: PhotoBank | None = None,
    photo: int | None = None,
    motion: int | None = None,
) -> Clips:
    """Samples and renders ``num_clips`` clips; deterministic in ``seed``.

    Args:
      seed: see :func:`sample_clip_params`.
      num_clips: batch size B.
      config: clip size.
      bank: a :class:`PhotoBank` of side ``config.bank_size`` (loaded when None).
      photo, motion: force the background photo / motion class.

    Returns:
      :class:`Clips` with NumPy arrays; ``video`` is float32[B, T, H, W, 3] in [-1, 1].
    """
    if bank is None:
        bank = load_photo_bank(config.bank_size)
    params = sample_clip_params(seed, num_clips, config, photo=photo, motion=motion)
    video = np.asarray(jax.jit(render_clips, static_argnums=2)(bank.images, params, config))
    return Clips(video=video, label=class_label(params.photo, params.motion), photo=params.photo, motion=params.motion)


def make_clip(
    seed: int | Sequence[int] | np.random.Generator,
    config: ClipConfig = ClipConfig(),
    *,
    bank: PhotoBank | None = None,
    photo: int | None = None,
    motion: int | None = None,
) -> tuple[Float[np.ndarray, "t h w 3"], int]:
    """One clip: ``(video float32[T, H, W, 3] in [-1, 1], class label)``; deterministic in ``seed``."""
    clips = make_clips(seed, 1, config, bank=bank, photo=photo, motion=motion)
    return clips.video[0], int(clips.label[0])


def clip_classes(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(photo, motion)`` int32[num_samples]: sample ``i`` is photo ``i % 8``, motion ``i % 5``
    (8 samples cover every photo and every motion)."""
    i = np.arange(check_positive_int(num_samples, "num_samples"))
    return (i % NUM_PHOTOS).astype(np.int32), (i % NUM_MOTIONS).astype(np.int32)
