"""The pages stay true to the code: symbol links, figures and anchors.

A link to the code names what it points at, not a line:
``[`GaussianDiffusion.q_sample`](../ddpm/diffusion.py#GaussianDiffusion.q_sample)``. The fragment is
a qualified name the linked file defines, read with :mod:`ast`: a module-level def, class or
assignment; in a class, a method, a class-body assignment or a ``self.name = ...`` in a method (local
variables do not count). The link's text is that name or its last part, maybe with ``()``. A renamed
or removed name fails here with the link in the message; line links (``#L143``) are refused, since
every edit above the line moves them.
"""

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

DOC = ROOT / "docs" / "theory.md"
PAGES = ["docs/theory.md", "docs/gallery.md", "README.md", "bench/RESULTS.md"]

# [`name`](../dir/file.py#Qualified.name): any link to a Python file that has a fragment.
SYMBOL_LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+\.py)#([^)\s]*)\)")
LINE_LINK = re.compile(r"\]\(([^)\s]*#L\d+[^)\s]*)\)")
FILE_LINK = re.compile(r"\]\(\.\./([^)#\s]+)(?:#[^)]*)?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR_LINK = re.compile(r"\]\(#([^)\s]+)\)")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
CODE_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def page_text(page: str) -> str:
    """A page without HTML comments (figure placeholders) and fenced code blocks."""
    return CODE_BLOCK.sub("", COMMENT.sub("", (ROOT / page).read_text(encoding="utf-8")))


def doc_text() -> str:
    return page_text("docs/theory.md")


def assigned(target: ast.expr, owner: str) -> Iterator[str]:
    """The names an assignment target binds: ``name`` (owner "") or ``self.name`` (owner "self")."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from assigned(element, owner)
    elif not owner and isinstance(target, ast.Name):
        yield target.id
    elif owner and isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        if target.value.id == owner:
            yield target.attr


def targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    return [node.target] if isinstance(node, ast.AnnAssign) else []


def defined_in(body: list[ast.stmt], prefix: str = "", in_class: bool = False) -> Iterator[str]:
    """The qualified names a module's or a class's statements define, each prefixed by ``prefix``."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield prefix + node.name
            yield from defined_in(node.body, f"{prefix}{node.name}.", in_class=True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name
            if in_class:  # a method's self.name = ... is the class's
                for sub in ast.walk(node):
                    yield from (prefix + name for t in targets(sub) for name in assigned(t, "self"))
        else:
            yield from (prefix + name for t in targets(node) for name in assigned(t, ""))


@functools.cache
def symbols(path: Path) -> frozenset[str]:
    """Every qualified name ``path`` defines: ``name``, ``Class.member``, ``Outer.Inner.member``."""
    return frozenset(defined_in(ast.parse(path.read_text(encoding="utf-8")).body))


def symbol_links() -> list[tuple[str, str, str, str]]:
    """(page, text, file, fragment) of every distinct link to a Python file with a fragment."""
    links = (((page, *m.groups()) for m in SYMBOL_LINK.finditer(page_text(page))) for page in PAGES)
    return list(dict.fromkeys(link for page_links in links for link in page_links))


def test_symbols_are_what_a_module_defines(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "LIMIT: int = 3\n"
        "a, b = 1, 2\n"
        "def f(x):\n    y = x\n    return y\n"
        "class C:\n"
        "    size = 1\n"
        "    def __init__(self):\n        self.w = 0\n        local = 1\n        other.z = local\n"
        "    class Inner:\n        def g(self):\n            if True:\n                self.v: int = 2\n"
    )
    expected = {"LIMIT", "a", "b", "f", "C", "C.size", "C.__init__", "C.w", "C.Inner", "C.Inner.g", "C.Inner.v"}
    assert symbols(source) == expected


def test_the_guide_has_symbol_links():
    links = [link for link in symbol_links() if link[0] == "docs/theory.md"]
    assert len(links) > 50
    # Every link to a Python file with a fragment has the form the checks below understand.
    assert len(SYMBOL_LINK.findall(doc_text())) == len(re.findall(r"\]\([^)\s]*\.py#", doc_text()))


@pytest.mark.parametrize("page", PAGES)
def test_no_line_links(page):
    stale = LINE_LINK.findall((ROOT / page).read_text(encoding="utf-8"))
    assert not stale, f"{page}: link by symbol (file.py#Class.name), not by line: {stale}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "page,text,target,fragment", [pytest.param(*link, id=f"{link[0]}:{link[3]}") for link in symbol_links()]
)
def test_symbol_link_names_a_definition(page, text, target, fragment):
    link = f"{page}: [{text}]({target}#{fragment})"
    path = (ROOT / page).parent / target
    assert path.is_file(), f"{link}: no file {target}"
    assert fragment in symbols(path), f"{link}: {target} defines no {fragment!r} (renamed or removed?)"
    name = text.strip("`").removesuffix("()")
    assert name in (fragment, fragment.rsplit(".", 1)[-1]), f"{link}: the text should name {fragment!r}"


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
    for target in RELATIVE_LINK.findall(page_text(page)):
        assert ((ROOT / page).parent / target).resolve().exists(), f"{page}: broken link {target}"


def test_the_gallery_stays_small():
    text = (ROOT / "docs" / "gallery.md").read_text(encoding="utf-8")
    sizes = {src: (DOC.parent / src).resolve().stat().st_size for src in IMAGE.findall(text)}
    assert len(sizes) >= 3
    assert max(sizes.values()) < 100_000
    # 1 MB: the figures of the runs (one or two per feature, each under 100 KB) and ddpm ui's three
    # screenshots (about 88 KB together); a clone should stay light.
    assert sum(sizes.values()) < 1_000_000, f"the gallery's images total {sum(sizes.values()):,} bytes"
    assert "MNIST_SECTION" not in text and "PRESET_TABLE" not in (ROOT / "README.md").read_text(encoding="utf-8")
