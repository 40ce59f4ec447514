"""Point the line links of docs/*.md at where the linked names are defined now.

A link ``[`GaussianDiffusion.q_sample`](../ddpm/diffusion.py#L143)`` names what it points at; when
the code moves, run ``python tools/relink_docs.py`` to rewrite every ``#LNNN`` to the line that
defines that name (``tests/test_docs.py`` fails until the links are right). Names it cannot find
are listed and left alone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# [`name`](../dir/file.py#L123): the name may be in backticks and end in "()".
LINE_LINK = re.compile(r"\[`?([^\]`]+?)(?:\(\))?`?\]\(\.\./((?:ddpm|tests)/[\w/]+\.py)#L(\d+)\)")


def defines(line: str, name: str) -> bool:
    """Whether ``line`` defines ``name``: def / class, or an assignment to it (maybe ``self.``, annotated)."""
    n = re.escape(name)
    return bool(
        re.match(rf"\s*(?:async\s+)?(?:def|class)\s+{n}\b", line)
        or re.match(rf"\s*(?:self\.)?{n}\s*(?::[^=]*)?=(?!=)", line)
    )


def enclosing_class(lines: list[str], index: int) -> str | None:
    """The top-level class whose body holds line ``index`` (0-based), if any."""
    for line in reversed(lines[:index]):
        m = re.match(r"(class|def)\s+(\w+)", line)  # column 0 only: top level
        if m:
            return m.group(2) if m.group(1) == "class" else None
    return None


def find_definition(lines: list[str], text: str) -> int | None:
    """The 1-based line that defines ``text`` (``name`` or ``Class.name``), the first one if several."""
    *owner, name = text.split(".")
    for i, line in enumerate(lines):
        if defines(line, name) and (not owner or enclosing_class(lines, i) == owner[0]):
            return i + 1
    return None


def relink(doc: Path) -> list[str]:
    """Rewrite ``doc``'s line links in place; returns the link texts that could not be resolved."""
    missing: list[str] = []

    def fix(m: re.Match[str]) -> str:
        text, path, old = m.group(1), m.group(2), int(m.group(3))
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        if 1 <= old <= len(lines) and defines(lines[old - 1], text.split(".")[-1]):
            return m.group(0)
        new = find_definition(lines, text)
        if new is None:
            missing.append(f"{text} in {path}")
            return m.group(0)
        return m.group(0).replace(f"#L{old})", f"#L{new})")

    source = doc.read_text(encoding="utf-8")
    updated = LINE_LINK.sub(fix, source)
    if updated != source:
        doc.write_text(updated, encoding="utf-8")
    return missing


def main() -> int:
    missing = [m for doc in sorted((ROOT / "docs").glob("*.md")) for m in relink(doc)]
    for m in missing:
        print(f"not found: {m}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
