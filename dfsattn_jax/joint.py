"""Joint text + video sequences (docs/spec.md §6.1): the token spans of a joint attention.

Models such as HunyuanVideo attend over one joint sequence ``[video; text]``: the video tokens
(in the backend's token order) come first, then all ``T`` text tokens in their own order, the
valid ones first and the padded ones last. Padded text keys are never attended: each sample's
valid key length ``kv_lengths[b] = video_len + valid_text[b]`` says where its keys end.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["JointTokens"]


class JointTokens(NamedTuple):
    """The spans of a joint sequence ``[video (L_v tokens); text (T tokens)]`` (static ints).

    Attributes:
      video_len: ``L_v``, the video tokens, first in the sequence.
      text_len: ``T``, the text tokens (valid first, then padding), after the video.
    """

    video_len: int
    text_len: int

    @property
    def length(self) -> int:
        """``L_v + T``: the joint sequence length."""
        return int(self.video_len) + int(self.text_len)

    def check(self, length: int) -> None:
        """Raises ``ValueError`` unless the spans are non-negative ints summing to ``length``."""
        for name, value in (("video_len", self.video_len), ("text_len", self.text_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"JointTokens.{name} must be a non-negative int, got {value!r}")
        if self.video_len < 1:
            raise ValueError(f"JointTokens.video_len must be >= 1, got {self.video_len}")
        if self.length != length:
            raise ValueError(
                f"JointTokens(video_len={self.video_len}, text_len={self.text_len}) spans {self.length} "
                f"tokens, the attention has {length}"
            )
