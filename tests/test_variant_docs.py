"""What the variants' docstrings must tell a user: pitfalls and how to set ρ."""

from __future__ import annotations

import inspect
import re

import optax
import pytest

import sam_optax

# A value such as 0.05, 10 or 1/β, but not a year: a 4-digit integer is not
# taken for one.
_NUMBER = re.compile(r"(?<![\d.])(\d*\.\d+|\d{1,3})(?![\d.])")
# A source: a year (as in "Foret et al., 2021") or an arXiv identifier.
_SOURCE = re.compile(r"\b(19|20)\d\d\b|arXiv")


def _factories() -> list[str]:
  """Public names of ``sam_optax`` whose return annotation is a transform."""
  names = []
  for name in sam_optax.__all__:
    obj = getattr(sam_optax, name)
    if not inspect.isfunction(obj):
      continue
    ret = inspect.signature(obj, eval_str=True).return_annotation
    if inspect.isclass(ret) and issubclass(ret, optax.GradientTransformation):
      names.append(name)
  return names


FACTORIES = _factories()


def _paragraph(doc: str, heading: str) -> str:
  """The blank-line separated block of ``doc`` that starts with ``heading``."""
  for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
    text = " ".join(block.split())
    if text.startswith(heading):
      return text
  return ""


def test_every_variant_factory_is_checked():
  expected = {
      "sam", "asam", "esam", "fisher_sam", "friendly_sam", "gsam", "looksam",
      "masked_sam", "fisher_masked_sam", "msam", "rwp", "sam_on", "usam",
      "vasso", "ae_sam", "sharpness_aware", "with_sam",
  }
  assert expected <= set(FACTORIES)


@pytest.mark.parametrize("name", FACTORIES)
def test_docstring_says_how_to_choose_rho(name):
  doc = getattr(sam_optax, name).__doc__
  text = _paragraph(doc, "Choosing rho:")
  assert text, f"`{name}` has no 'Choosing rho:' paragraph"
  assert _NUMBER.search(text[len("Choosing rho:"):]), (
      f"`{name}`: the 'Choosing rho' paragraph gives no value: {text}"
  )
  assert _SOURCE.search(text), f"`{name}`: the paragraph names no source: {text}"
  if name != "sam":  # every other variant relates its ρ to SAM's
    assert "SAM's" in text, f"`{name}`: no comparison with SAM's ρ: {text}"


def test_looksam_warns_about_its_reused_component():
  doc = sam_optax.looksam.__doc__
  start = doc.index("Warning: the reused component")
  warning = " ".join(doc[start:doc.index("Args:")].split())
  # What is reused, and its size.
  assert "orthogonal" in warning and r"\alpha \|g\|" in warning
  # When it is wrong: its length ignores ρ, and it is stale.
  assert "does not depend on ρ" in warning
  assert "stale" in warning and "k - 1" in warning
  # What to do.
  assert "tune together with ``rho``" in warning
  assert "alpha=0" in warning and ":func:`sam_optax.sam`" in warning
