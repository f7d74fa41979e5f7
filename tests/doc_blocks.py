"""The ```python blocks of a Markdown page, as the documentation tests run them.

A block inside a list item is indented with its fence; it runs dedented.
"""

from __future__ import annotations

import pathlib
import re
import textwrap

_FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.S | re.M)


def python_blocks(path: pathlib.Path | str) -> list[str]:
  """The code of every ```python block of the page at ``path``, in order."""
  text = pathlib.Path(path).read_text(encoding="utf-8")
  return [textwrap.dedent(body) for _, body in _FENCE.findall(text)]
