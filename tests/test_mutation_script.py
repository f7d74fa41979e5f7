"""The on-demand mutation run (benchmarks/mutation.py): its list applies cleanly."""

from __future__ import annotations

import shutil

from benchmarks import mutation


def test_lists_at_least_fifteen_rule_mutations(capsys):
  out = mutation.main(["--list"])
  assert len(out["mutations"]) == len(mutation.MUTATIONS) >= 15
  assert sum(m.rule for m in mutation.MUTATIONS) >= 15
  assert "agree-keeps-device-0" in capsys.readouterr().out


def test_a_mutation_applies_to_a_copy_and_a_missing_text_is_not_applicable(tmp_path):
  m = next(m for m in mutation.MUTATIONS if m.id == "sam-norm-without-eps")
  (tmp_path / m.file).parent.mkdir(parents=True)
  shutil.copy2(mutation.ROOT / m.file, tmp_path / m.file)
  assert mutation.apply(m, tmp_path) is None
  text = (tmp_path / m.file).read_text()
  assert m.new in text and m.old not in text
  assert "found 0 times" in mutation.apply(m, tmp_path)  # applied already
  assert m.old in (mutation.ROOT / m.file).read_text()  # the tree is untouched


def test_every_mutation_finds_its_text_once_in_the_current_source():
  """A refactor that moves a rule must move its mutation too."""
  for m in mutation.MUTATIONS:
    text = (mutation.ROOT / m.file).read_text()
    assert text.count(m.old) == 1, (m.id, m.file, text.count(m.old))
