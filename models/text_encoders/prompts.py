"""Prompts to token ids, and encoder outputs to transformer context, as diffusers' ``WanPipeline`` does.

No PyTorch and no ``transformers``: the tokenizer is the ``tokenizers`` package (Hugging Face's
Rust tokenizer library) reading ``tokenizer.json`` from a checkpoint's ``tokenizer/`` folder.

The steps ``WanPipeline`` takes before and after its UMT5 text encoder:

1. :func:`clean_prompt`: ``ftfy.fix_text`` when ftfy is installed (mojibake, curly quotes,
   full-width letters), HTML entities decoded twice (``&amp;lt;`` becomes ``<``), then runs of
   whitespace collapsed to one space and both ends stripped.
2. :class:`PromptTokenizer`: T5 tokenization padded to ``max_sequence_length`` (512 by default)
   with id 0, longer prompts truncated, and ``</s>`` appended (kept when truncating). Returns
   int32 ``input_ids`` and ``attention_mask`` ``[B, L]`` as NumPy arrays.
3. :func:`trim_and_pad`: of the encoder's ``[B, L, D]`` output, each prompt keeps its first
   ``seq_len`` rows (its tokens and ``</s>``); the rest become zeros. The Wan transformer gets
   these zeros with no key mask, so zeroing is what matters, not masking.

The tokenizer follows what ``AutoTokenizer`` gives in transformers 5, whose ``T5Tokenizer``
rebuilds its pipeline from the class rather than taking the whole of ``tokenizer.json``: it keeps
the file's vocabulary, added tokens and SentencePiece ``Precompiled`` normalization table; splits
on whitespace and marks word starts with ``▁`` (``Metaspace``); uses ``<unk>`` (id 2) for
characters outside the vocabulary, with no byte fallback; and appends ``</s>``. The
``tokenizers`` package does each of these steps; this module only assembles them the same way.

Negative prompts: diffusers' default is the empty prompt (``</s>`` alone, then zeros). The
official Wan code uses a long Chinese negative prompt; both are in :data:`NEGATIVE_PROMPTS`.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import re
import threading
import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tokenizers import Tokenizer, pre_tokenizers, processors

__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "NEGATIVE_PROMPTS",
    "PromptTokenizer",
    "TokenizedPrompts",
    "clean_prompt",
    "negative_prompt",
    "trim_and_pad",
]

#: ``WanPipeline.__call__``'s ``max_sequence_length`` default (the Wan models' text length).
DEFAULT_MAX_SEQUENCE_LENGTH = 512

# The official Wan negative prompt, as the Wan2.1/Wan2.2 code ships it (shared config).
_WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

#: Negative prompts by name: ``"diffusers"``, the empty prompt that ``WanPipeline`` uses when none
#: is given; ``"wan"``, the official Wan code's default (Chinese, as shipped).
NEGATIVE_PROMPTS: Mapping[str, str] = types.MappingProxyType({"diffusers": "", "wan": _WAN_NEGATIVE_PROMPT})

# Unicode White_Space: what ``\s`` matches in the ``regex`` module that diffusers cleans with.
# (The standard ``re`` module's ``\s`` also matches U+001C..U+001F, which diffusers keeps.)
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

# transformers' T5Tokenizer: <pad>, </s>, <unk> at ids 0, 1, 2; word starts marked with U+2581.
_T5_UNK_ID = 2
_METASPACE = "\u2581"
_T5_CLASSES = ("T5Tokenizer", "T5TokenizerFast")
_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def _ftfy_module():
    """The ``ftfy`` module, or None when it is not installed (checked on each call: cheap after
    the first import, and a test can hide or provide the module)."""
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def clean_prompt(prompt: str, *, fix_text: bool | None = None) -> str:
    """One prompt cleaned as ``WanPipeline`` cleans it before tokenizing.

    ``ftfy.fix_text`` (when used), ``html.unescape`` twice, strip, then every run of Unicode
    whitespace (tabs, newlines, no-break and ideographic spaces, ...) becomes one space, and the
    ends are stripped again.

    Args:
      prompt: the text.
      fix_text: run ``ftfy.fix_text`` first. ``None`` (default): when ftfy is installed, as
        ``WanPipeline`` does; ``True``: always (an error when ftfy is missing); ``False``: never.
        ftfy changes what the encoder sees (for example the Chinese full-width comma becomes
        ``,``), so pass ``True`` or ``False`` for results that do not depend on the environment.

    Raises:
      TypeError: ``prompt`` is not a string, or ``fix_text`` is not a bool or None.
      ImportError: ``fix_text=True`` and ftfy is not installed.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if fix_text is not None and not isinstance(fix_text, bool):
        raise TypeError(f"fix_text must be True, False or None, got {fix_text!r}")
    if fix_text is not False:
        ftfy = _ftfy_module()
        if ftfy is not None:
            prompt = ftfy.fix_text(prompt)
        elif fix_text:
            raise ImportError("clean_prompt(fix_text=True) needs the ftfy package: pip install ftfy")
    prompt = html.unescape(html.unescape(prompt)).strip()
    return _WHITESPACE_RUN.sub(" ", prompt).strip()


def negative_prompt(name: str) -> str:
    """The negative prompt called ``name`` in :data:`NEGATIVE_PROMPTS` (``"diffusers"``: ``""``;
    ``"wan"``: the official Wan one).

    Raises:
      ValueError: ``name`` is not one of the names.
    """
    if name not in NEGATIVE_PROMPTS:
        raise ValueError(f"negative prompt name must be one of {', '.join(map(repr, NEGATIVE_PROMPTS))}; got {name!r}")
    return NEGATIVE_PROMPTS[name]


class TokenizedPrompts(NamedTuple):
    """Token ids and attention mask of a batch of prompts (NumPy, right-padded)."""

    input_ids: np.ndarray
    """int32 ``[B, L]``: the prompt's tokens, ``</s>`` (id 1 in T5), then ``<pad>`` (id 0)."""
    attention_mask: np.ndarray
    """int32 ``[B, L]``: 1 on the tokens and ``</s>``, 0 on the padding."""

    @property
    def seq_lens(self) -> np.ndarray:
        """int32 ``[B]``: each prompt's length, ``</s>`` included (what :func:`trim_and_pad` keeps)."""
        return self.attention_mask.sum(axis=1, dtype=np.int32)


def _check_length(max_sequence_length: Any) -> int:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)):
        raise TypeError(f"max_sequence_length must be an int, got {max_sequence_length!r}")
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1 (room for </s>), got {max_sequence_length}")
    return int(max_sequence_length)


def _prompt_list(prompts: Any, name: str) -> list[str]:
    """``prompts`` as a non-empty list of strings (one string is a batch of one)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(prompt).__name__}")
    return list(prompts)


def _read_json(file: pathlib.Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(file)!r} as JSON: {err}") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_folder(path: str | os.PathLike) -> pathlib.Path:
    """The folder holding tokenizer.json: ``path`` itself or its ``tokenizer/`` subfolder."""
    root = pathlib.Path(path)
    for folder in (root, root / "tokenizer"):
        if (folder / _TOKENIZER_FILE).is_file():
            return folder
    if not root.exists():
        raise ValueError(f"path: {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"path: {str(root)!r} is not a folder (give a checkpoint root or its tokenizer/ folder)")
    raise ValueError(
        f"path: no {_TOKENIZER_FILE} in {str(root)!r} nor in its tokenizer/ folder (a diffusers Wan "
        f"checkpoint keeps the fast-tokenizer file there; spiece.model alone is not read)"
    )


def _precompiled_normalizer(normalizer: Any) -> dict | None:
    """The ``Precompiled`` entry of a stored normalizer (alone or in a ``Sequence``), else None."""
    if not isinstance(normalizer, dict):
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return part
    return None


def _t5_backend(data: dict, file: pathlib.Path, eos_token: str, unk_token: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with transformers 5's T5 pipeline over the file's vocabulary."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{str(file)!r}: expected a T5 (Unigram) tokenizer model, found {kind!r}")
    vocab = model["vocab"]
    entry = vocab[_T5_UNK_ID] if len(vocab) > _T5_UNK_ID else None
    found = entry[0] if isinstance(entry, list) and entry else None
    if found != unk_token:
        raise ValueError(
            f"{str(file)!r}: token {_T5_UNK_ID} must be the unknown token {unk_token!r} as in T5 "
            f"vocabularies, found {found!r}"
        )
    data = dict(data)
    data["model"] = {**model, "unk_id": _T5_UNK_ID}
    if "byte_fallback" in model:
        data["model"]["byte_fallback"] = False  # transformers' T5Tokenizer: unknown characters -> <unk>
    data["normalizer"] = _precompiled_normalizer(data.get("normalizer"))
    data["pre_tokenizer"] = None
    data["post_processor"] = None
    data["decoder"] = None
    data["truncation"] = None
    data["padding"] = None
    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as err:  # noqa: BLE001 (the Rust parser's error type is not exported on every version)
        raise ValueError(f"{str(file)!r} is not a tokenizer file this `tokenizers` can read: {err}") from None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True),
        ]
    )
    eos_id = backend.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"{str(file)!r}: the end-of-sequence token {eos_token!r} is not in the vocabulary")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token], special_tokens=[(eos_token, eos_id)]
    )
    return backend


class PromptTokenizer:
    """T5 tokenization of prompts as ``WanPipeline`` calls its tokenizer, on ``tokenizers`` alone.

    Build it with :meth:`from_pretrained` on a diffusers checkpoint (or its ``tokenizer/``
    folder). Calling it cleans the prompts (:func:`clean_prompt`) then tokenizes them
    (:meth:`tokenize`), which is ``WanPipeline``'s ``_get_t5_prompt_embeds`` up to the encoder::

        tokenizer = PromptTokenizer.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
        ids, mask = tokenizer(["a cat on the grass", "a dog"])     # int32 [2, 512] each

    Thread-safe: the length settings of the shared ``tokenizers`` object are set and used under
    a lock.
    """

    def __init__(self, backend: Tokenizer, *, pad_token: str = "<pad>", source: str = "(in memory)"):
        """Wrap a ``tokenizers.Tokenizer`` whose pipeline is already T5's (see :meth:`from_pretrained`).

        Args:
          backend: the ``tokenizers.Tokenizer``; its post-processor appends ``</s>``.
          pad_token: the padding token (its id fills the padding; 0 in T5).
          source: where it came from, for messages.
        """
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{source}: the padding token {pad_token!r} is not in the vocabulary")
        self._backend = backend
        self._pad_token = pad_token
        self._pad_id = int(pad_id)
        self._lock = threading.Lock()
        self.source = source

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PromptTokenizer:
        """Read ``tokenizer.json`` (and ``tokenizer_config.json`` or ``special_tokens_map.json`` when
        present) from ``path`` or ``path/tokenizer/``.

        Args:
          path: a diffusers checkpoint root or its ``tokenizer/`` folder.

        Raises:
          ValueError: no ``tokenizer.json`` in either place (the message names ``path``); an
            unreadable file, a tokenizer class other than T5's, a vocabulary without T5's
            ``<unk>`` at id 2, or special tokens missing from the vocabulary (each names the file).
        """
        folder = _tokenizer_folder(path)
        file = folder / _TOKENIZER_FILE
        tokens = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        for name in (_SPECIAL_TOKENS_FILE, _CONFIG_FILE):  # the config wins where both say
            if not (folder / name).is_file():
                continue
            config = _read_json(folder / name)
            if not isinstance(config, dict):
                raise ValueError(f"{str(folder / name)!r} must hold a JSON object")  # noqa: TRY004 (file content)
            tokens = {key: _token_text(config.get(key)) or default for key, default in tokens.items()}
            kind = config.get("tokenizer_class")
            if name == _CONFIG_FILE and kind is not None and kind not in _T5_CLASSES:
                raise ValueError(
                    f"{str(folder / name)!r}: tokenizer_class {kind!r} is not T5's ({', '.join(_T5_CLASSES)})"
                )
        data = _read_json(file)
        if not isinstance(data, dict):
            raise ValueError(f"{str(file)!r} must hold a JSON object")  # noqa: TRY004 (file content)
        backend = _t5_backend(data, file, tokens["eos_token"], tokens["unk_token"])
        return cls(backend, pad_token=tokens["pad_token"], source=str(folder))

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the encoder's embedding table may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def tokenize(
        self, texts: str | Sequence[str], *, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    ) -> TokenizedPrompts:
        """Tokenize ``texts`` as they are (no cleaning), as ``WanPipeline`` calls its tokenizer:
        ``padding="max_length"``, ``truncation=True``, ``add_special_tokens=True``.

        Each row holds the text's tokens, cut to ``max_sequence_length - 1`` if longer, then
        ``</s>``, then the padding id up to ``max_sequence_length``.

        Returns:
          :class:`TokenizedPrompts`: int32 ``input_ids`` and ``attention_mask`` ``[B, L]`` with
          ``B = len(texts)`` (1 for a string) and ``L = max_sequence_length``.

        Raises:
          TypeError / ValueError: ``texts`` is not a string or a non-empty list of strings;
            ``max_sequence_length`` is not an int >= 1.
        """
        batch = _prompt_list(texts, "texts")
        length = _check_length(max_sequence_length)
        with self._lock:
            self._backend.enable_truncation(max_length=length)
            self._backend.enable_padding(length=length, pad_id=self._pad_id, pad_token=self._pad_token)
            encodings = self._backend.encode_batch(batch, add_special_tokens=True)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(len(batch), length)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32).reshape(len(batch), length)
        return TokenizedPrompts(ids, mask)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        fix_text: bool | None = None,
    ) -> TokenizedPrompts:
        """Clean (:func:`clean_prompt`, ``fix_text`` passed on) then :meth:`tokenize` ``prompts``."""
        batch = _prompt_list(prompts, "prompts")
        cleaned = [clean_prompt(p, fix_text=fix_text) for p in batch]
        return self.tokenize(cleaned, max_sequence_length=max_sequence_length)

    def __repr__(self) -> str:
        return f"PromptTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def trim_and_pad(
    hidden: Float[Array, "b s d"],
    mask: Int[Array, "b s"],
    max_sequence_length: int | None = None,
) -> Float[Array, "b l d"]:
    """What ``WanPipeline`` hands the transformer from the encoder's output: per prompt the first
    ``seq_len = mask.sum()`` rows (its tokens and ``</s>``), then zero rows up to
    ``max_sequence_length``.

    Works on NumPy or JAX arrays and under ``jax.jit`` (shapes are static; the lengths come from
    ``mask``). The dtype of ``hidden`` is kept.

    Args:
      hidden: ``[B, S, D]`` encoder output (``last_hidden_state``).
      mask: ``[B, S]`` attention mask from :meth:`PromptTokenizer.tokenize` (nonzero = token).
      max_sequence_length: output length ``L >= S``; default ``S``.

    Returns:
      ``[B, L, D]`` array: ``hidden`` where the position is below the prompt's length, else 0.

    Raises:
      ValueError: ``hidden`` is not 3-D, ``mask`` is not ``[B, S]``, or ``max_sequence_length``
        is below ``S``; TypeError: ``max_sequence_length`` is not an int.
    """
    if getattr(hidden, "ndim", None) != 3:
        raise ValueError(f"hidden must be [B, S, D], got shape {getattr(hidden, 'shape', None)}")
    b, s, _ = hidden.shape
    if getattr(mask, "shape", None) != (b, s):
        raise ValueError(f"mask must be [B, S] = {(b, s)} like hidden, got shape {getattr(mask, 'shape', None)}")
    length = s if max_sequence_length is None else _check_length(max_sequence_length)
    if length < s:
        raise ValueError(f"max_sequence_length must be >= the encoded length {s}, got {length}")
    hidden = jnp.asarray(hidden)
    seq_len = jnp.sum(jnp.asarray(mask) != 0, axis=1)
    keep = jnp.arange(s)[None, :] < seq_len[:, None]
    out = jnp.where(keep[:, :, None], hidden, jnp.zeros((), hidden.dtype))
    if length > s:
        out = jnp.pad(out, ((0, 0), (0, length - s), (0, 0)))
    return out
