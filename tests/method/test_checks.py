"""The shared integer checks (``dfsattn_jax/checks.py``) and the configs that use them: one rule
everywhere (Python or NumPy integers; no bools, no floats even when whole), one message."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dfsattn_jax.checks import check_int_fields, check_nonnegative_int, check_positive_int


@pytest.mark.parametrize("value", [1, 7, np.int32(3), np.int64(2**40), np.uint8(5)])
def test_positive_int_accepts_integers_and_returns_python_ints(value):
    out = check_positive_int(value, "n")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, np.float32(2.0), "3", None, np.bool_(True), [1]])
def test_positive_int_rejects_others_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^n_blocks must be a positive integer, got "):
        check_positive_int(value, "n_blocks")


def test_nonnegative_int_accepts_zero_and_rejects_negatives_bools_floats():
    assert check_nonnegative_int(0, "k") == 0 and type(check_nonnegative_int(np.int16(4), "k")) is int
    for value in (-1, True, 1.0):
        with pytest.raises(ValueError, match=r"^k must be a non-negative integer, got "):
            check_nonnegative_int(value, "k")


@dataclasses.dataclass(frozen=True)
class _Sizes:
    rows: int
    extra: int = 0

    def __post_init__(self) -> None:
        check_int_fields(self, ("rows",), prefix="sizes.")
        check_int_fields(self, ("extra",), nonnegative=True)


def test_int_fields_store_python_ints_and_name_the_prefixed_field():
    sizes = _Sizes(np.int64(3), np.int32(0))
    assert (sizes.rows, sizes.extra) == (3, 0) and type(sizes.rows) is int and type(sizes.extra) is int
    assert hash(sizes) == hash(_Sizes(3, 0))
    with pytest.raises(ValueError, match=r"^sizes\.rows must be a positive integer, got True"):
        _Sizes(True)
    with pytest.raises(ValueError, match=r"^extra must be a non-negative integer, got -2"):
        _Sizes(1, -2)


def _configs():
    from models.evaluation.clips import ClipConfig
    from models.evaluation.codec import LatentCodec
    from models.hunyuan_video.config import get_config as hunyuan_config
    from models.wan.config import get_config as wan_config

    return [
        (wan_config("wan2.1-1.3b"), "num_layers", "num_layers"),
        (hunyuan_config("hunyuan-video-13b"), "head_dim", "head_dim"),
        (ClipConfig(), "frames", "frames"),
        (LatentCodec(), "space_to_depth", "space_to_depth"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_configs_reject_bool_and_float_fields_and_normalise_numpy_ints(index):
    config, field, label = _configs()[index]
    good = getattr(config, field)
    replaced = dataclasses.replace(config, **{field: np.int64(good)})
    assert getattr(replaced, field) == good and type(getattr(replaced, field)) is int
    for bad in (True, float(good)):
        with pytest.raises(ValueError, match=rf"^{label.replace('.', chr(92) + '.')} must be a positive integer"):
            dataclasses.replace(config, **{field: bad})


def test_score_tuning_check_uses_the_shared_rule():
    from pallas_kernels.block_scores_triton import ScoreTuning

    ScoreTuning(num_warps=np.int32(8)).check(1)
    for bad in (True, 4.0, 0):
        with pytest.raises(ValueError, match=r"^tuning\.num_stages must be a positive integer"):
            ScoreTuning(num_stages=bad).check(1)
