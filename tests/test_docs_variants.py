"""The examples of the variant pages run as printed and compute what the pages say.

Every ```` ```python ```` block of the five family pages under
``docs/variants/`` is found with a regular expression on the page's text and
executed as printed, in a fresh namespace (so each block must carry its own
imports). Each page holds exactly one such block, and its example follows
this convention, which the checks below read:

* ``losses``: a dict from a method's label to the list of its training
  losses, the loss at the initial parameters first, then the loss after
  every step;
* ``first_updates``: a dict from the same labels to the update that the
  method (chained with SGD, or the full optimizer) returned on the first
  step;
* the names the example is built from: ``loss_fn``, ``init_params``,
  ``lr``, and where the page has one, its table ``variants`` of
  ``label -> (factory, kwargs)``; the efficient page also keeps
  ``extra_passes``, ``steps``, ``rho``, ``k`` and ``msam_rho``, the
  full-optimizer page ``ece``.

Checked for every page: the losses are finite and end lower than they
start. Where a method's first step is easy to write out, it is recomputed
here, independently of the package, in float64 NumPy from the equation on
the page (two passes for SAM's point, four for GAM, every domain order for
DGSAM, the two inner steps of Lookbehind-SAM with the momentum they share,
...), and compared with ``first_updates``. The hyperparameters come from
the example's ``variants`` table, or, for the efficient and full-optimizer
pages, are the values printed there (``FULL`` below).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.doc_blocks import python_blocks

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "variants"
PAGES = ("geometry", "sparse", "directions", "efficient", "full_optimizers")
_ROLE = re.compile(r"\{(?:func|class)\}`([^`<]+)`")

# The full-optimizer page's values: wsam_decoupled(rho=0.05, gamma=0.88) and
# lookbehind_sam(rho=0.05, k=2, alpha=0.5), each around sgd(lr, momentum=0.9).
FULL = {"rho": 0.05, "gamma": 0.88, "k": 2, "alpha": 0.5, "momentum": 0.9}


def _text(page: str) -> str:
  return (DOCS / f"{page}.md").read_text(encoding="utf-8")


def _blocks(page: str) -> list[str]:
  return python_blocks(DOCS / f"{page}.md")


@functools.lru_cache(maxsize=None)
def _run(page: str) -> dict:
  """The namespace left by the page's example, executed once per session."""
  (code,) = _blocks(page)
  namespace = {"__name__": f"docs_variants_{page}"}
  exec(compile(code, f"docs/variants/{page}.md", "exec"), namespace)  # noqa: S102
  return namespace


# ----------------------------------------------------------------- float64 trees


def _wide(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _add(a, b, scale=1.0):
  return jax.tree.map(lambda x, y: x + scale * y, a, b)


def _scale(a, c):
  return jax.tree.map(lambda x: c * x, a)


def _dot(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return float(sum(np.sum(x * y) for x, y in pairs))


def _norm(a):
  return math.sqrt(_dot(a, a))


def _flat(tree):
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


def _grad_fn(ns, loss=None):
  """``w -> ∇L(w)`` in float64, the gradient taken at ``w`` cast to the
  parameters' dtype; ``loss`` defaults to the page's ``loss_fn`` (its first
  output where it returns ``(loss, aux)``)."""
  if loss is None:
    raw = ns["loss_fn"]

    def loss(p):
      out = raw(p)
      return out[0] if isinstance(out, tuple) else out

  like = ns["init_params"]
  grad = jax.grad(loss)

  def at(w):
    point = jax.tree.map(lambda x, p: jnp.asarray(x, p.dtype), w, like)
    return _wide(grad(point))

  return at


def _at_start(ns):
  """The float64 gradient function, the initial parameters and the clean
  gradient there."""
  grad = _grad_fn(ns)
  w = _wide(ns["init_params"])
  return grad, w, grad(w)


def _assert_update(ns, label, expected):
  actual = _flat(ns["first_updates"][label])
  expected = _flat(expected)
  assert np.all(np.isfinite(actual)), label
  np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-6, err_msg=label)


def _sam_point(w, g, rho):
  return _add(w, g, rho / _norm(g))


# ----------------------------------------------------------------- every page


@pytest.mark.parametrize("page", PAGES)
def test_page_has_one_self_contained_example(page):
  blocks = _blocks(page)
  assert len(blocks) == 1, f"{page}.md has {len(blocks)} python blocks"
  assert re.search(r"^import jax$", blocks[0], re.M), "the block imports what it uses"
  assert re.search(r"^import sam_optax$", blocks[0], re.M)


@pytest.mark.parametrize("page", PAGES)
def test_api_roles_name_public_objects(page):
  targets = _ROLE.findall(_text(page))
  assert targets, f"{page}.md links no API entry"
  for target in targets:
    first, *rest = target.strip().split(".")
    assert first == "sam_optax", target
    obj = importlib.import_module(first)
    for name in rest:  # submodules are attributes (sam_optax.perturbations)
      obj = getattr(obj, name, None)
      assert obj is not None, f"{page}.md: `{target}` names nothing"
    assert callable(obj), target


@pytest.mark.parametrize("page", PAGES)
def test_example_trains(page):
  ns = _run(page)
  losses = ns["losses"]
  assert losses and set(losses) == set(ns["first_updates"])
  out = ns["loss_fn"](ns["init_params"])
  start = float(out[0] if isinstance(out, tuple) else out)  # computed here
  for label, history in losses.items():
    history = np.asarray(history, np.float64)
    assert history.ndim == 1 and len(history) > 2, label
    assert np.all(np.isfinite(history)), f"{page}: {label} is not finite"
    np.testing.assert_allclose(history[0], start, rtol=1e-6, err_msg=label)
    assert history[-1] < start, f"{page}: {label} did not lower the loss"


# ----------------------------------------------------------------- geometry


def _geometry_epsilon(name, kw, w, g):
  rho = kw["rho"]
  if name in ("sam", "friendly_sam", "vasso"):  # F-SAM, VaSSO: d_0 = g_0
    return _scale(g, rho / _norm(g))
  if name in ("asam", "samson"):
    eta = kw.get("eta", 0.01)
    if name == "asam":
      t = jax.tree.map(lambda x: np.abs(x) + eta, w)
    else:  # divided by the leaf's largest magnitude; 1 where that is 0
      t = jax.tree.map(
          lambda x: (np.abs(x) + eta) / np.max(np.abs(x)) if np.max(np.abs(x)) > 0
          else np.ones_like(x), w)
    tg = jax.tree.map(lambda a, b: a * b, t, g)
    return jax.tree.map(lambda a, b: rho * a * b / _norm(tg), t, tg)
  if name == "fisher_sam":
    eta = kw.get("eta", 1.0)
    u = jax.tree.map(lambda x: x / (1.0 + eta * x * x), g)
    return _scale(u, rho / math.sqrt(_dot(g, u)))
  if name == "usam":
    return _scale(g, rho)
  if name == "gcsam":  # each kernel's mean over all axes but the last removed
    c = jax.tree.map(
        lambda x: x - x.mean(axis=tuple(range(x.ndim - 1)), keepdims=True)
        if x.ndim >= 2 else x, g)
    return _scale(c, rho / _norm(g))
  raise KeyError(name)


@pytest.mark.parametrize(
    "name",
    ["sam", "asam", "samson", "fisher_sam", "usam", "gcsam", "friendly_sam", "vasso"],
)
def test_geometry_first_step_is_the_pages_rule(name):
  ns = _run("geometry")
  factory, kw = ns["variants"][name]
  assert factory.__name__ == name
  grad, w, g = _at_start(ns)
  u = grad(_add(w, _geometry_epsilon(name, kw, w, g)))
  _assert_update(ns, name, _scale(u, -ns["lr"]))


def test_geometry_references_tell_the_variants_apart():
  """The references differ from SAM's by far more than the tolerance."""
  ns = _run("geometry")
  grad, w, g = _at_start(ns)
  sam = _flat(grad(_add(w, _geometry_epsilon("sam", {"rho": 0.05}, w, g))))
  for name in ("asam", "samson", "fisher_sam", "usam", "gcsam"):
    other = _flat(grad(_add(w, _geometry_epsilon(name, ns["variants"][name][1], w, g))))
    assert np.max(np.abs(other - sam)) > 1e-3 * np.max(np.abs(sam)), name


# ----------------------------------------------------------------- sparse


def _leaf_mask(params, select):
  """Boolean arrays shaped like ``params``: ``select(path names)`` per leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.full(np.shape(x), select([p.key for p in path]), bool), params)


def _top(score_leaves, keep):
  flat = np.concatenate([np.ravel(s) for s in score_leaves])
  chosen = np.zeros(flat.size, bool)
  chosen[np.argsort(-flat, kind="stable")[:keep]] = True
  out, start = [], 0
  for s in score_leaves:
    out.append(chosen[start:start + s.size].reshape(s.shape))
    start += s.size
  return out


@pytest.mark.parametrize(
    "label",
    ["masked_sam", "sam_on", "fisher_masked_sam", "fisher_masked_sam, fsam4plm"],
)
def test_sparse_first_step_is_the_pages_rule(label):
  ns = _run("sparse")
  _, kw = ns["variants"][label]
  rho = kw["rho"]
  grad, w, g = _at_start(ns)
  if label == "masked_sam":  # "masked": the norm of M ⊙ g
    bools = kw["mask"]
    mask = jax.tree.map(lambda b, x: np.full(x.shape, b, bool), bools, w)
    norm_of, eps = "masked", 1e-12
  elif label == "sam_on":  # the LayerNorm's scale and bias, written by hand
    mask = _leaf_mask(w, lambda names: names[0] == "LayerNorm_0")
    norm_of, eps = "masked", 1e-12
  else:  # the top (1 - sparsity) of g², at step 0
    sparsity = kw.get("sparsity", 0.9)
    leaves, treedef = jax.tree.flatten(g)
    if label == "fisher_masked_sam":  # all ranked; round; eps 1e-12
      exempt = [False] * len(leaves)
      n = sum(x.size for x in leaves)
      keep, eps = max(1, round((1 - sparsity) * n)), 1e-12
    else:  # Zhong et al.: biases exempt; floor; eps 1e-7
      paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
      exempt = [any("bias" in p.key for p in path) for path in paths]
      n = sum(x.size for x, e in zip(leaves, exempt) if not e)
      keep, eps = math.floor(round(1 - sparsity, 12) * n), 1e-7
    ranked = _top([x * x for x, e in zip(leaves, exempt) if not e], keep)
    ranked = iter(ranked)
    mask = jax.tree.unflatten(treedef, [
        np.ones(x.shape, bool) if e else next(ranked)
        for x, e in zip(leaves, exempt)
    ])
    norm_of = "full"
  masked = jax.tree.map(lambda m, x: np.where(m, x, 0.0), mask, g)
  denominator = (_norm(masked) if norm_of == "masked" else _norm(g)) + eps
  u = grad(_add(w, _scale(masked, rho / denominator)))
  _assert_update(ns, label, _scale(u, -ns["lr"]))


# ----------------------------------------------------------------- directions


def test_directions_first_steps_are_the_pages_rules():
  ns = _run("directions")
  variants, lr = ns["variants"], ns["lr"]
  grad, w, g = _at_start(ns)

  kw = variants["gsam"][1]
  g_p = grad(_sam_point(w, g, kw["rho"]))
  unit = _scale(g_p, 1.0 / _norm(g_p))
  g_perp = _add(g, unit, -_dot(g, unit))
  _assert_update(ns, "gsam", _scale(_add(g_p, g_perp, -kw["alpha"]), -lr))

  kw = variants["wsam"][1]
  alpha = kw["gamma"] / (1.0 - kw["gamma"])
  g_p = grad(_sam_point(w, g, kw["rho"]))
  _assert_update(ns, "wsam", _scale(_add(g, _add(g_p, g, -1.0), alpha), -lr))

  kw = variants["gam"][1]
  rho, rho_p = kw["rho"], kw["rho"] * kw["rho_prime_ratio"]
  unit = lambda v: _scale(v, 1.0 / _norm(v))  # noqa: E731
  g1 = grad(_add(w, unit(g), rho_p))
  d = _add(g1, g, -1.0)
  base = _add(w, unit(d), rho)
  g2 = grad(base)
  g3 = grad(_add(base, unit(g2), rho_p))
  u = _add(_scale(g1, kw["beta1"]), g3, 1.0 - kw["beta1"])
  m = _add(g, g2, 1.0 - kw["beta0"])
  m_perp = _add(m, unit(u), -_dot(m, unit(u)))
  _assert_update(ns, "gam", _scale(_add(u, m_perp, -kw["gamma"]), -lr))

  # SAMPa's step 0: no stored gradient, no ascent, y_1 = x_0: u_0 = g.
  _assert_update(ns, "sampa", _scale(g, -lr))


def test_dgsam_first_step_is_the_rule_for_one_domain_order():
  ns = _run("directions")
  kw = ns["variants"]["dgsam"][1]
  rho, s = kw["rho"], kw["num_domains"]
  domain_grads = [
      _grad_fn(ns, loss=lambda p, d=d: ns["domain_loss_fn"](p, d)) for d in range(s)]
  w = _wide(ns["init_params"])
  actual = _flat(ns["first_updates"]["dgsam"])
  gaps = []
  for order in itertools.permutations(range(s)):
    point, total = w, _scale(w, 0.0)
    for i in range(s + 1):
      g_i = domain_grads[order[i % s]](point)
      total = _add(total, g_i)
      point = _add(point, g_i, rho / _norm(g_i))
    expected = _flat(_scale(total, -ns["lr"] / (s + 1)))
    gaps.append(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
  assert min(gaps) < 2e-4, gaps
  assert sorted(gaps)[1] > 1e-3, "the orders must be told apart"


# ----------------------------------------------------------------- efficient


def test_efficient_first_steps_and_pass_counts():
  ns = _run("efficient")
  lr, rho, k, steps = ns["lr"], ns["rho"], ns["k"], ns["steps"]
  grad, w, g = _at_start(ns)
  sam_u = grad(_sam_point(w, g, rho))
  # SGD with momentum: the first step is -lr times its gradient.
  for label in ("sam", "looksam", "looksam, alpha=0.2"):  # step 0 is a SAM step
    _assert_update(ns, label, _scale(sam_u, -lr))

  # AE-SAM's gate at step 0, from the page's moving averages (from 0, δ = 0.9,
  # c_0 = lambda_start = 1).
  sq = _norm(g) ** 2
  mean = 0.1 * sq
  var = 0.1 * (sq - mean) ** 2
  took = sq >= mean + 1.0 * math.sqrt(var)
  _assert_update(ns, "ae_sam", _scale(sam_u if took else g, -lr))

  # MSAM: the base step -lr g plus the new offset ρ u/‖u‖ = -ρ g/‖g‖.
  _assert_update(ns, "msam", _add(_scale(g, -lr), g, -ns["msam_rho"] / _norm(g)))

  passes = ns["extra_passes"]
  assert passes["sam"] == steps
  assert passes["looksam"] == passes["looksam, alpha=0.2"] == len(range(0, steps, k))
  assert passes["msam"] == 0
  assert 0 < passes["ae_sam"] < steps
  # The sentence under the example: a smaller alpha ends lower.
  assert ns["losses"]["looksam, alpha=0.2"][-1] < ns["losses"]["looksam"][-1]


# ----------------------------------------------------------------- full optimizers


def test_full_optimizers_first_steps():
  ns = _run("full_optimizers")
  lr, rho = ns["lr"], FULL["rho"]
  grad, w, g = _at_start(ns)

  alpha = FULL["gamma"] / (1.0 - FULL["gamma"])
  g_p = grad(_sam_point(w, g, rho))
  expected = _add(_scale(g, -lr), _add(g_p, g, -1.0), -lr * alpha)
  _assert_update(ns, "wsam_decoupled", expected)

  # Lookbehind-SAM, k = 2: two ascents of length ρ from the last point, each
  # followed by an SGD-momentum step of the fast weights (one shared trace).
  point, fast, trace, g_j = w, w, _scale(w, 0.0), g
  for _ in range(FULL["k"]):
    point = _sam_point(point, g_j, rho)
    g_j = grad(point)
    trace = _add(g_j, trace, FULL["momentum"])
    fast = _add(fast, trace, -lr)
  _assert_update(ns, "lookbehind_sam", _scale(_add(fast, w, -1.0), FULL["alpha"]))


def test_bsam_calibration_is_a_fraction():
  ns = _run("full_optimizers")
  assert set(ns["ece"]) == {"model average", "mean weights"}
  for value in ns["ece"].values():
    assert np.isfinite(value) and 0.0 <= value <= 1.0
