"""DFSAttn in JAX: dynamic fine-grained block-sparse attention for video diffusion transformers."""

from dfsattn_jax.attention import block_sparse_attention, dense_attention
from dfsattn_jax.cache import MaskCache, cache_layout, cache_update, init_mask_cache
from dfsattn_jax.joint import JointTokens, joint_attention, select_joint_blocks
from dfsattn_jax.layout import BlockLayout, blocks_for_density, full_layout, select_blocks
from dfsattn_jax.metrics import attention_error, layout_recall
from dfsattn_jax.orders import check_grid, inverse_permutation, token_order
from dfsattn_jax.reference import reference_block_sparse_attention
from dfsattn_jax.schedule import SCHEDULE_PRESETS, DFSConfig, SchedulePlan, get_schedule_preset, plan_schedule
from dfsattn_jax.scoring import block_scores, tile_probabilities

__all__ = [
    "BlockLayout",
    "DFSConfig",
    "JointTokens",
    "MaskCache",
    "SCHEDULE_PRESETS",
    "SchedulePlan",
    "attention_error",
    "block_scores",
    "block_sparse_attention",
    "blocks_for_density",
    "cache_layout",
    "cache_update",
    "check_grid",
    "dense_attention",
    "full_layout",
    "get_schedule_preset",
    "init_mask_cache",
    "inverse_permutation",
    "joint_attention",
    "layout_recall",
    "plan_schedule",
    "reference_block_sparse_attention",
    "select_blocks",
    "select_joint_blocks",
    "tile_probabilities",
    "token_order",
]
__version__ = "0.1.0"
