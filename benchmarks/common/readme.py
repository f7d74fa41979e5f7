"""Generated README regions: the text between two HTML comment markers."""

from __future__ import annotations

from pathlib import Path


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
  Path(readme).write_text(head + start + "\n" + body + "\n" + end + tail)
