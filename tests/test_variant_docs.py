"""What the variants' docstrings must tell a user: pitfalls and how to set ρ."""

from __future__ import annotations

import sam_optax


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
