"""docs/theory.md stays true to the code: line links, figures and anchors.

A link such as ``[`GaussianDiffusion.q_sample`](../ddpm/diffusion.py#L143)`` must land on the line that
defines the name in its text: ``def q_sample``, ``class LossAwareSampler``, or an assignment
``posterior_variance = ...`` (``self.`` and an annotation allowed). A dotted name ``Class.member``
must also sit inside that class. When the code moves, the link fails here instead of silently
pointing at the wrong line; ``python tools/relink_docs.py`` moves the links along.
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from relink_docs import LINE_LINK, defines, enclosing_class  # noqa: E402

DOC = ROOT / "docs" / "theory.md"

FILE_LINK = re.compile(r"\]\(\.\./([^)#\s]+)(?:#[^)]*)?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR_LINK = re.compile(r"\]\(#([^)\s]+)\)")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
CODE_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def doc_text() -> str:
    """The guide without HTML comments (figure placeholders) and fenced code blocks."""
    return CODE_BLOCK.sub("", COMMENT.sub("", DOC.read_text(encoding="utf-8")))


def line_links() -> list[tuple[str, str, int]]:
    return [(m.group(1), m.group(2), int(m.group(3))) for m in LINE_LINK.finditer(doc_text())]


def test_the_guide_has_line_links():
    links = line_links()
    assert len(links) > 50
    # Every "#L" link to the code or the tests has the form the checks below understand.
    assert len(links) == len(re.findall(r"\]\(\.\./(?:ddpm|tests)/[^)]*#L", doc_text()))


@pytest.mark.parametrize("text,path,lineno", line_links(), ids=lambda v: str(v))
def test_line_link_points_at_the_definition(text, path, lineno):
    assert re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", text), f"link text {text!r} is not a (Class.)name"
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    assert 1 <= lineno <= len(lines), f"{path} has {len(lines)} lines, link points at L{lineno}"
    *owner, name = text.split(".")
    line = lines[lineno - 1]
    assert defines(line, name), f"{path}:{lineno} does not define {name!r}: {line.strip()!r}"
    if owner:
        assert enclosing_class(lines, lineno - 1) == owner[0], f"{path}:{lineno} is not inside class {owner[0]}"


def test_linked_files_exist():
    for target in FILE_LINK.findall(doc_text()):
        assert (DOC.parent / ".." / target).resolve().is_file(), f"broken link ../{target}"


def test_figures_exist_and_are_small():
    images = IMAGE.findall(doc_text())
    assert images
    for src in images:
        path = (DOC.parent / src).resolve()
        assert path.is_file(), f"missing figure {src}"
        assert path.stat().st_size < 100_000, f"{src} is {path.stat().st_size} bytes; keep figures under 100 KB"


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_internal_anchors_exist():
    text = doc_text()
    slugs = {github_slug(h) for h in re.findall(r"^#+\s+(.+)$", text, re.MULTILINE)}
    for anchor in ANCHOR_LINK.findall(text):
        assert anchor in slugs, f"no heading for #{anchor}"


def test_display_math_is_balanced():
    assert doc_text().count("$$") % 2 == 0


RELATIVE_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "docs/gallery.md", "bench/RESULTS.md"])
def test_relative_links_of_the_other_pages_exist(page):
    path = ROOT / page
    text = CODE_BLOCK.sub("", COMMENT.sub("", path.read_text(encoding="utf-8")))
    targets = RELATIVE_LINK.findall(text)
    for target in targets:
        assert (path.parent / target).resolve().exists(), f"{page}: broken link {target}"


def test_the_gallery_stays_small():
    text = (ROOT / "docs" / "gallery.md").read_text(encoding="utf-8")
    sizes = {src: (DOC.parent / src).resolve().stat().st_size for src in IMAGE.findall(text)}
    assert len(sizes) >= 3
    assert max(sizes.values()) < 100_000
    assert sum(sizes.values()) < 500_000, f"the gallery's images total {sum(sizes.values()):,} bytes"
    assert "MNIST_SECTION" not in text and "PRESET_TABLE" not in (ROOT / "README.md").read_text(encoding="utf-8")
