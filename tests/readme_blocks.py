"""The README's code blocks, for the tests that run them as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(language: str = "bash") -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


def readme_file(name: str) -> str:
    """The README's Python block whose first line is the comment ``# name`` (or
    ``# name: what it is``): a file the README asks its reader to save as ``name``."""
    (source,) = [b for b in readme_blocks("python")
                 if re.match(rf"# {re.escape(name)}(:|\n)", b)]
    return source + "\n"
