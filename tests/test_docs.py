"""The README and docs/: links that resolve, the test command CI runs, no development history.

Their code examples run as doctests (pyproject's ``--doctest-glob=*.md`` over ``README.md`` and
``docs``); this file checks what doctests cannot.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "CHANGELOG.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Words of a development log, not of a description of the software.
HISTORY = re.compile(r"\bsessions?\b|the issue's|this (shared )?machine|\bprevious\b|until then",
                     re.IGNORECASE)


def read(page: str) -> str:
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    return f.read()


def anchors(text: str) -> set[str]:
  """GitHub's anchors of a page's headings."""
  out = set()
  for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    out.add(slug)
  return out


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  text = read(page)
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue  # a URL
    path, _, anchor = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(os.path.join(REPO, linked)), (page, target)
    if anchor and linked.endswith(".md"):
      assert anchor in anchors(read(linked)), (page, target)


@pytest.mark.parametrize("page", PAGES)
def test_pages_describe_the_software_not_its_history(page):
  assert not HISTORY.findall(read(page)), page


@pytest.mark.parametrize("page", PAGES)
def test_commands_need_nothing_outside_the_checkout(page):
  assert "../shared" not in read(page), page


def test_readme_is_short_and_gives_the_test_command():
  text = read("README.md")
  assert len(text.splitlines()) <= 150
  testing = text.split("## Testing", 1)[1].split("\n## ", 1)[0]
  assert "```bash\npython -m pytest\n```" in testing  # .ci/run runs exactly this command


def test_readme_lists_every_public_function_with_its_options():
  import inspect

  import jaxce

  text = read("README.md")
  for name in jaxce.__all__:
    params = inspect.signature(getattr(jaxce, name)).parameters.values()
    keyword = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    row = f"`{name}({', '.join(positional)}" + (f", *, {', '.join(keyword)})`" if keyword else ")`")
    assert row in text, row
