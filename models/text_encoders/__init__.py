"""Text encoders in Flax NNX, with the loaders for their diffusers checkpoint folders.

- :mod:`models.text_encoders.umt5`: the UMT5 encoder Wan conditions on (transformers'
  ``UMT5EncoderModel``): :class:`UMT5Config` (``"umt5-xxl"``, ``"tiny"``), :class:`UMT5EncoderModel`,
  the relative-position buckets.
- :mod:`models.text_encoders.umt5_loading`: :func:`load_umt5`, :func:`read_umt5_config` and
  :func:`umt5_shard_count` for a checkpoint's ``text_encoder/`` folder.
- :mod:`models.text_encoders.prompts`: prompts as WanPipeline prepares them, without PyTorch: the
  cleaning, :class:`PromptTokenizer` over a checkpoint's ``tokenizer/`` folder, and
  :func:`trim_and_pad` (each prompt's rows, then zeros).
"""

from models.text_encoders.prompts import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    NEGATIVE_PROMPTS,
    PromptTokenizer,
    TokenizedPrompts,
    clean_prompt,
    negative_prompt,
    trim_and_pad,
)
from models.text_encoders.umt5 import (
    CONFIGS as UMT5_CONFIGS,
    UMT5Config,
    UMT5EncoderModel,
    get_config as get_umt5_config,
    relative_position_bucket,
    relative_position_buckets,
)
from models.text_encoders.umt5_loading import load_umt5, read_umt5_config, text_encoder_dir, umt5_shard_count

__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "NEGATIVE_PROMPTS",
    "PromptTokenizer",
    "TokenizedPrompts",
    "UMT5_CONFIGS",
    "UMT5Config",
    "UMT5EncoderModel",
    "clean_prompt",
    "get_umt5_config",
    "load_umt5",
    "negative_prompt",
    "read_umt5_config",
    "relative_position_bucket",
    "relative_position_buckets",
    "text_encoder_dir",
    "trim_and_pad",
    "umt5_shard_count",
]
