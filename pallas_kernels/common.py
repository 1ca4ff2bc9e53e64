"""What every kernel module shares: the base-2 logit constant, the power-of-two rule and the
``interpret`` surface.

Every kernel takes ``interpret: bool = False``: ``False`` compiles for the GPU (the kernel's own
backend), ``True`` runs it in its Pallas interpreter on any backend (slow; the CPU tests). The
Mosaic GPU kernel also takes a ``plgpu.InterpretGPUParams`` there.
"""

from __future__ import annotations

import math

__all__ = ["LOG2E", "check_interpret", "is_power_of_two", "refuse_unsupported"]

#: ``log2(e)``: the kernels keep logits in base 2, ``exp(x * scale) == exp2(x * scale * LOG2E)``.
LOG2E = math.log2(math.e)


def is_power_of_two(x: int) -> bool:
    """Whether ``x`` is an integer power of two (1, 2, 4, ...); ``False`` for non-integers."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and (x & (x - 1)) == 0


def check_interpret(interpret) -> bool:
    """``interpret`` as a Python bool (a kernel's static argument).

    Raises:
      TypeError: for anything but a bool (``None`` too: every kernel's default is ``False``).
    """
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be True or False, got {interpret!r}")
    return interpret


def refuse_unsupported(reason: str | None, kernel: str) -> None:
    """Raises ``NotImplementedError`` ("``kernel`` does not support this input: ``reason``") unless
    ``reason`` is ``None``: a kernel's ``unsupported(q, block_size)`` said it cannot take the input.
    Callers that choose by reason (``dfsattn_jax.dispatch``) ask ``unsupported`` first."""
    if reason is not None:
        raise NotImplementedError(f"{kernel} does not support this input: {reason}")
