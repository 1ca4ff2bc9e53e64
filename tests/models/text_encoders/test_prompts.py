"""Prompt cleaning, T5 tokenization and trim-and-pad without PyTorch (models.text_encoders.prompts).

The fixture ``tests/fixtures/t5_tokenizer_tiny`` was made by
``tests/fixtures/make_tokenizer_fixture.py``: a tiny Unigram tokenizer trained with
``tokenizers`` and saved as a Wan checkpoint's ``tokenizer/`` folder, transformers 5's
``AutoTokenizer`` ids and masks on it, diffusers' prompt cleaning, and diffusers'
``WanPipeline.encode_prompt`` outputs with a tiny random UMT5 encoder (versions in its
metadata.json).
"""

from __future__ import annotations

import json
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import FIXTURES

from models.text_encoders.prompts import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    NEGATIVE_PROMPTS,
    PromptTokenizer,
    TokenizedPrompts,
    clean_prompt,
    negative_prompt,
    trim_and_pad,
)

FIXTURE = FIXTURES / "t5_tokenizer_tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
META = json.loads((FIXTURE / "metadata.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in EXPECTED["cases"]}
TEXTS = EXPECTED["texts"]


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer.from_pretrained(FIXTURE)


def _expected(texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ids and mask for ``texts`` at ``max_length=length``, from the fixture."""
    table = EXPECTED["tokenized"][str(length)]
    rows = [TEXTS.index(t) for t in texts]
    return np.asarray(table["input_ids"])[rows], np.asarray(table["attention_mask"])[rows]


# --- tokenization against transformers' AutoTokenizer ---------------------------------------


@pytest.mark.parametrize("length", [int(n) for n in EXPECTED["tokenized"]])
def test_ids_and_masks_equal_transformers(tokenizer, length):
    out = tokenizer.tokenize(TEXTS, max_sequence_length=length)
    ids, mask = _expected(TEXTS, length)
    assert isinstance(out, TokenizedPrompts)
    assert out.input_ids.dtype == np.int32 and out.attention_mask.dtype == np.int32
    assert out.input_ids.shape == out.attention_mask.shape == (len(TEXTS), length)
    for text, got, want in zip(TEXTS, out.input_ids.tolist(), ids.tolist()):
        assert got == want, f"ids differ from transformers' for {text[:40]!r}"
    np.testing.assert_array_equal(out.attention_mask, mask)


def test_fixture_covers_the_cases_that_matter():
    """The prompts reach <unk>, truncation, the empty prompt, and prompts where reading
    tokenizer.json as it is would not give transformers' ids (so those tests can fail)."""
    assert {"ascii", "chinese", "emoji", "html_entities", "extra_whitespace", "over_long", "empty"} <= set(CASES)
    assert "emoji" in META["unk_prompts"]
    assert {"emoji", "whitespace_nel_metaspace"} <= set(META["prompts_where_tokenizer_json_as_is_differs"])
    ids, mask = _expected([CASES["over_long"]["prompt"], ""], 512)
    assert mask.sum(1).tolist() == [512, 1]
    assert ids[0, -1] == 1 and ids[1].tolist() == [1] + [0] * 511


def test_pipeline_call_equals_diffusers_cleaning_then_transformers(tokenizer):
    """tokenizer(prompts) = clean (diffusers' prompt_clean, no ftfy) then AutoTokenizer."""
    prompts = [case["prompt"] for case in EXPECTED["cases"]]
    cleaned = [case["clean"]["no_ftfy"] for case in EXPECTED["cases"]]
    out = tokenizer(prompts, fix_text=False)
    ids, mask = _expected(cleaned, DEFAULT_MAX_SEQUENCE_LENGTH)
    np.testing.assert_array_equal(out.input_ids, ids)
    np.testing.assert_array_equal(out.attention_mask, mask)
    np.testing.assert_array_equal(out.seq_lens, mask.sum(1))


def test_one_prompt_and_one_at_a_time_equal_the_batch(tokenizer):
    batch = tokenizer.tokenize(TEXTS[:6], max_sequence_length=8)
    for i, text in enumerate(TEXTS[:6]):
        single = tokenizer.tokenize(text, max_sequence_length=8)
        assert single.input_ids.shape == (1, 8)
        np.testing.assert_array_equal(single.input_ids[0], batch.input_ids[i])
        np.testing.assert_array_equal(single.attention_mask[0], batch.attention_mask[i])


def test_checkpoint_root_with_tokenizer_folder(tmp_path, tokenizer):
    shutil.copytree(FIXTURE, tmp_path / "tokenizer")
    from_root = PromptTokenizer.from_pretrained(tmp_path)
    assert from_root.vocab_size == tokenizer.vocab_size == META["vocab_size"]
    assert from_root.pad_id == 0
    np.testing.assert_array_equal(from_root.tokenize(TEXTS).input_ids, tokenizer.tokenize(TEXTS).input_ids)


def test_tokenizer_json_alone_is_enough(tmp_path, tokenizer):
    """A folder with only tokenizer.json: T5's default special tokens."""
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path / "tokenizer.json")
    alone = PromptTokenizer.from_pretrained(tmp_path)
    np.testing.assert_array_equal(alone.tokenize(TEXTS).input_ids, tokenizer.tokenize(TEXTS).input_ids)


# --- cleaning -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_clean_without_ftfy_equals_diffusers(name):
    case = CASES[name]
    assert clean_prompt(case["prompt"], fix_text=False) == case["clean"]["no_ftfy"]


def test_clean_with_ftfy_equals_diffusers():
    """Only where ftfy is installed (it is optional); the dispatch to it is tested below with a
    stand-in module."""
    pytest.importorskip("ftfy")
    for case in EXPECTED["cases"]:
        assert clean_prompt(case["prompt"], fix_text=True) == case["clean"]["ftfy"], case["name"]
        assert clean_prompt(case["prompt"]) == case["clean"]["ftfy"], case["name"]


@pytest.fixture
def fake_ftfy(monkeypatch):
    """A stand-in ftfy whose fix_text marks the text, recording its calls."""
    calls = []

    def fix_text(text):
        calls.append(text)
        return text.replace("â€™", "'")

    monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=fix_text))
    return calls


def test_ftfy_runs_first_when_installed(fake_ftfy):
    # fix_text sees the raw text, before html.unescape and the whitespace collapse
    assert clean_prompt("doesnâ€™t  &amp;amp;amp; x") == "doesn't &amp; x"
    assert fake_ftfy == ["doesnâ€™t  &amp;amp;amp; x"]
    assert clean_prompt("doesnâ€™t", fix_text=True) == "doesn't"
    assert clean_prompt("doesnâ€™t", fix_text=False) == "doesnâ€™t"
    assert len(fake_ftfy) == 2


def test_no_ftfy_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError
    assert clean_prompt(" doesnâ€™t ") == "doesnâ€™t"
    with pytest.raises(ImportError, match=r"clean_prompt\(fix_text=True\) needs the ftfy package"):
        clean_prompt("x", fix_text=True)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("&amp;lt;b&amp;gt;", "<b>"),  # two rounds of unescaping, as diffusers does
        ("&amp;amp;lt;", "&lt;"),  # and not three
        ("a\u00a0\u2003\u3000\u1680\u0085\u2028b", "a b"),  # Unicode White_Space collapses
        ("a\x1cb\x1f", "a\x1cb"),  # U+001C..U+001F are kept inside (diffusers' regex) but stripped at the ends
        ("\x1c a  b \x1f", "a b"),
        ("a\u200bb", "a\u200bb"),  # zero-width space is not whitespace
        ("  \t\n", ""),
        ("", ""),
    ],
)
def test_clean_whitespace_and_entities(raw, clean):
    assert clean_prompt(raw, fix_text=False) == clean


def test_negative_prompts(tokenizer):
    assert NEGATIVE_PROMPTS["diffusers"] == "" == negative_prompt("diffusers")
    assert negative_prompt("wan") == NEGATIVE_PROMPTS["wan"] == CASES["wan_negative"]["prompt"]
    assert set(NEGATIVE_PROMPTS) == {"diffusers", "wan"}
    with pytest.raises(ValueError, match="negative prompt name must be one of 'diffusers', 'wan'; got 'none'"):
        negative_prompt("none")
    with pytest.raises(TypeError):
        NEGATIVE_PROMPTS["mine"] = "x"  # read-only
    empty = tokenizer(negative_prompt("diffusers"), max_sequence_length=4)
    np.testing.assert_array_equal(empty.input_ids, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(empty.attention_mask, [[1, 0, 0, 0]])


# --- trim and pad ---------------------------------------------------------------------------


def test_trim_and_pad_equals_diffusers_encode_prompt(tokenizer):
    """ids, mask and what WanPipeline.encode_prompt hands the transformer, on the encoder's
    recorded output (max_sequence_length 32, negative prompt "" by default)."""
    ref = load_file(FIXTURE / "wan_prompt_embeds.safetensors")
    length = META["embed_max_sequence_length"]
    prompts = [CASES[name]["prompt"] for name in META["embed_prompts"]]
    out = tokenizer(prompts, max_sequence_length=length)
    np.testing.assert_array_equal(out.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(out.attention_mask, ref["attention_mask"])
    neg = tokenizer([negative_prompt("diffusers")] * len(prompts), max_sequence_length=length)
    np.testing.assert_array_equal(neg.input_ids, ref["negative_input_ids"])
    np.testing.assert_array_equal(neg.attention_mask, ref["negative_attention_mask"])
    assert np.all(ref["hidden"][:, -1] != 0), "the encoder output is non-zero past the prompts"

    jitted = jax.jit(trim_and_pad, static_argnums=2)
    for hidden, mask, want in (
        (ref["hidden"], out.attention_mask, ref["prompt_embeds"]),
        (ref["negative_hidden"], neg.attention_mask, ref["negative_prompt_embeds"]),
    ):
        np.testing.assert_array_equal(np.asarray(trim_and_pad(hidden, mask, length)), want)
        np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(hidden), jnp.asarray(mask), length)), want)


def _numpy_trim_and_pad(hidden: np.ndarray, mask: np.ndarray, length: int) -> np.ndarray:
    """WanPipeline's loop: u[:v] then zeros up to ``length``, prompt by prompt."""
    rows = []
    for u, m in zip(hidden, mask):
        v = int((m > 0).sum())
        rows.append(np.concatenate([u[:v], np.zeros((length - v, u.shape[1]), u.dtype)]))
    return np.stack(rows)


@pytest.mark.parametrize("length", [None, 12, 20])
def test_trim_and_pad_random_against_numpy_loop(length):
    rng = np.random.default_rng(25)
    b, s, d = 4, 12, 6
    hidden = rng.standard_normal((b, s, d)).astype(np.float32)
    lens = np.array([1, 5, 12, 7])
    mask = (np.arange(s)[None, :] < lens[:, None]).astype(np.int32)
    want = _numpy_trim_and_pad(hidden, mask, s if length is None else length)
    got = trim_and_pad(hidden, mask, length)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_trim_and_pad_keeps_the_first_rows_and_the_dtype():
    """WanPipeline keeps the first mask.sum() rows whatever the mask's shape; padded rows become
    zeros even when they hold NaN; bfloat16 stays bfloat16."""
    rng = np.random.default_rng(26)
    hidden = rng.standard_normal((2, 6, 3)).astype(np.float32)
    hidden[0, 4:] = np.nan
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0]])
    want = _numpy_trim_and_pad(hidden, mask, 8)
    np.testing.assert_array_equal(np.asarray(trim_and_pad(hidden, mask, 8)), want)
    half = trim_and_pad(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(mask), 8)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(half, np.float32),
        _numpy_trim_and_pad(np.asarray(jnp.asarray(hidden, jnp.bfloat16), np.float32), mask, 8),
    )


# --- errors ---------------------------------------------------------------------------------


def test_missing_folder_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"path: '.*nowhere' does not exist"):
        PromptTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"path: no tokenizer.json in '.*' nor in its tokenizer/ folder"):
        PromptTokenizer.from_pretrained(tmp_path)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        PromptTokenizer.from_pretrained(file)


def _copy_with(tmp_path, name: str, edit) -> None:
    for f in FIXTURE.iterdir():
        if f.suffix == ".json" and f.name not in ("expected.json", "metadata.json"):
            shutil.copy(f, tmp_path / f.name)
    data = json.loads((tmp_path / name).read_text(encoding="utf-8"))
    edit(data)
    (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")


def test_bad_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read '.*tokenizer.json' as JSON"):
        PromptTokenizer.from_pretrained(tmp_path)

    _copy_with(tmp_path, "tokenizer_config.json", lambda c: c.update(tokenizer_class="LlamaTokenizer"))
    with pytest.raises(ValueError, match=r"tokenizer_config.json': tokenizer_class 'LlamaTokenizer' is not T5's"):
        PromptTokenizer.from_pretrained(tmp_path)

    _copy_with(tmp_path, "tokenizer.json", lambda d: d["model"].update(type="BPE"))
    with pytest.raises(ValueError, match=r"tokenizer.json': expected a T5 \(Unigram\) tokenizer model, found 'BPE'"):
        PromptTokenizer.from_pretrained(tmp_path)

    def swap(d):
        d["model"]["vocab"][1], d["model"]["vocab"][2] = d["model"]["vocab"][2], d["model"]["vocab"][1]

    _copy_with(tmp_path, "tokenizer.json", swap)
    with pytest.raises(ValueError, match=r"token 2 must be the unknown token '<unk>' as in T5 vocab.*found '</s>'"):
        PromptTokenizer.from_pretrained(tmp_path)

    _copy_with(tmp_path, "tokenizer_config.json", lambda c: c.update(pad_token="<padding>"))
    with pytest.raises(ValueError, match="the padding token '<padding>' is not in the vocabulary"):
        PromptTokenizer.from_pretrained(tmp_path)

    _copy_with(tmp_path, "tokenizer_config.json", lambda c: c.update(eos_token={"content": "<eos>"}))
    with pytest.raises(ValueError, match="the end-of-sequence token '<eos>' is not in the vocabulary"):
        PromptTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_sequence_length": 0}, ValueError, "max_sequence_length must be >= 1"),
        ({"max_sequence_length": -3}, ValueError, "max_sequence_length must be >= 1"),
        ({"max_sequence_length": 8.0}, TypeError, "max_sequence_length must be an int, got 8.0"),
        ({"max_sequence_length": True}, TypeError, "max_sequence_length must be an int, got True"),
        ({"max_sequence_length": "512"}, TypeError, "max_sequence_length must be an int"),
    ],
)
def test_bad_lengths(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        tokenizer.tokenize("a cat", **kwargs)
    with pytest.raises(error, match=match):
        tokenizer("a cat", **kwargs)


def test_bad_prompts(tokenizer):
    with pytest.raises(TypeError, match="prompts must be a string or a non-empty list of strings"):
        tokenizer([])
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        tokenizer(["a", 3])
    with pytest.raises(TypeError, match="texts must be a string or a non-empty list of strings"):
        tokenizer.tokenize(None)
    with pytest.raises(TypeError, match="prompt must be a string, got bytes"):
        clean_prompt(b"a cat")
    with pytest.raises(TypeError, match="fix_text must be True, False or None"):
        clean_prompt("a cat", fix_text="yes")


def test_trim_and_pad_errors():
    hidden = np.ones((2, 4, 3), np.float32)
    mask = np.ones((2, 4), np.int32)
    with pytest.raises(ValueError, match=r"hidden must be \[B, S, D\], got shape \(2, 4\)"):
        trim_and_pad(mask, mask)
    with pytest.raises(ValueError, match=r"mask must be \[B, S\] = \(2, 4\) like hidden, got shape \(2, 5\)"):
        trim_and_pad(hidden, np.ones((2, 5)))
    with pytest.raises(ValueError, match="max_sequence_length must be >= the encoded length 4, got 3"):
        trim_and_pad(hidden, mask, 3)
    with pytest.raises(TypeError, match="max_sequence_length must be an int"):
        trim_and_pad(hidden, mask, True)
