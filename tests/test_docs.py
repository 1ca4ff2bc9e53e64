"""README.md and docs/: every relative link resolves, the quoted ``--help`` is the parser's, and the
README stays one screen with its two Quick-start commands as written.

Links are checked the way GitHub renders them: a path relative to the page must exist, and a
``#fragment`` must name a heading of the target page under GitHub's slug rule (:func:`github_slug`).
External ``http(s)`` links are not checked. Links inside code (fenced blocks, inline spans) are
not links.
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

from helpers import ROOT
from models.cli_args import build_parser

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

#: The two Quick-start commands, exactly as a user copies them (Done-when of issue 24: both work as written).
QUICK_START_COMMANDS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m models.demo',
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q -n 2',
)

#: Where the docs quote ``dfsattn-generate --help``: the first ```text block under this heading.
HELP_PAGE = DOCS / "wan.md"
HELP_HEADING = "### `dfsattn-generate --help`"

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def pages() -> list[pathlib.Path]:
    """README.md and every Markdown page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lowercase, every character that is not a letter, a
    digit, ``_``, ``-`` or a space dropped (backticks, dots, ``×``, ...), spaces turned into ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_slugs(text: str) -> set[str]:
    """Anchors of every heading of a Markdown page; a repeated slug gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    slugs = set()
    for line in prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images of a page that are not external, in order."""
    targets = []
    for line in prose_lines(text):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not _EXTERNAL.match(target):
                targets.append(target)
    return targets


def broken_link(page: pathlib.Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) does not resolve, or None when it does."""
    path_part, _, fragment = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"{page.relative_to(ROOT)}: {target}: no such file or folder"
    if fragment:
        if dest.suffix != ".md":
            return f"{page.relative_to(ROOT)}: {target}: a #fragment into a page that is not Markdown"
        if fragment not in heading_slugs(dest.read_text()):
            return f"{page.relative_to(ROOT)}: {target}: no heading of {dest.name} has the anchor #{fragment}"
    return None


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("`dfsattn-generate --help`", "dfsattn-generate---help"),
        ("6.1 Joint text + video sequences (HunyuanVideo style)", "61-joint-text--video-sequences-hunyuanvideo-style"),
        ("Wan2.1-1.3B, 480p×81", "wan21-13b-480p81"),
        ("Several GPUs (`models/common/parallel.py`, `benchmarks/multi_gpu_bench.py`)",
         "several-gpus-modelscommonparallelpy-benchmarksmulti_gpu_benchpy"),
        ("The `fast` preset: a faster schedule at equal fidelity", "the-fast-preset-a-faster-schedule-at-equal-fidelity"),
    ],
)  # fmt: skip
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_heading_slugs_number_repeats_and_skip_code():
    text = "# Title\n## Notes\n```bash\n# not a heading\n```\n## Notes\n### Notes\n"
    assert heading_slugs(text) == {"title", "notes", "notes-1", "notes-2"}


def test_relative_links_skip_external_links_and_code():
    text = (
        "See [spec](docs/spec.md#2-token-orders), ![plot](a/b.png) and [site](https://jax.dev).\n"
        "Inline `x[0](y)` is code.\n```python\nf[a](b)\n```\n[here](#title)\n"
    )
    assert relative_links(text) == ["docs/spec.md#2-token-orders", "a/b.png", "#title"]


def test_broken_links_are_named(tmp_path, monkeypatch):
    """The checker itself: a missing file and an unknown anchor are reported, good links are not."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# A\n## Part one\n")
    page = tmp_path / "b.md"
    page.write_text("x")
    assert broken_link(page, "a.md#part-one") is None and broken_link(page, "a.md") is None
    assert "no such file" in broken_link(page, "missing.md")
    assert "#part-two" in broken_link(page, "a.md#part-two")


def test_every_relative_link_resolves():
    found = [(page, target) for page in pages() for target in relative_links(page.read_text())]
    assert len(found) > 20, "the link scan found almost nothing: is the link pattern broken?"
    broken = [why for page, target in found if (why := broken_link(page, target))]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README.read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {missing}"


def help_block(text: str, heading: str) -> str:
    """The first ```text block after the line ``heading``, before the next heading."""
    lines = text.splitlines()
    assert lines.count(heading) == 1, f"expected exactly one line {heading!r}"
    section = "\n".join(lines[lines.index(heading) + 1 :]) + "\n"
    section = re.split(r"\n#{1,6} ", section, maxsplit=1)[0]
    blocks = re.findall(r"^```text\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, f"no ```text block under {heading!r}"
    return blocks[0]


def test_quoted_help_is_the_parsers(monkeypatch):
    """The --help quoted in the docs is what the parser prints; its width is fixed, whatever the terminal."""
    monkeypatch.setenv("COLUMNS", "60")
    assert help_block(HELP_PAGE.read_text(), HELP_HEADING) == build_parser().format_help()


def test_help_is_quoted_once():
    quoting = [p.name for p in pages() if "usage: dfsattn-generate" in p.read_text()]
    assert quoting == [HELP_PAGE.name]


def test_readme_fits_one_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("command", QUICK_START_COMMANDS)
def test_readme_quick_start_commands_as_written(command):
    assert command in README.read_text().splitlines()
