"""Generated report regions: the text between two HTML comment markers.

The benchmarks write their reports into the documentation pages under
``docs/benchmarks/`` (``--report PAGE``). Links in a generated body are
written relative to the repository root (``benchmarks/results/plot.png``);
they are rewritten relative to the page that receives them.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def relative_links(body: str, page: Path) -> str:
  """``body`` with its ``](benchmarks/...)`` links made relative to ``page``."""
  up = os.path.relpath(ROOT, Path(page).resolve().parent)
  if up == ".":
    return body
  return body.replace("](benchmarks/", f"]({Path(up).as_posix()}/benchmarks/")


def replace_region(readme: Path, start: str, end: str, body: str) -> None:
  """Replaces what stands between ``start`` and ``end`` in ``readme`` by ``body``.

  Everything outside the markers is kept byte for byte; the markers must
  each appear exactly once.
  """
  text = Path(readme).read_text()
  if text.count(start) != 1 or text.count(end) != 1:
    raise ValueError(f"{readme} needs exactly one {start} ... {end} block.")
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  body = relative_links(body, Path(readme))
  Path(readme).write_text(head + start + "\n" + body + "\n" + end + tail)
