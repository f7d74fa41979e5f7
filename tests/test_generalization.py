"""The generalization benchmark: its pieces, and its quick mode end to end."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from benchmarks import generalization as gen
from benchmarks.common import cnn, noise
from benchmarks.common import data as data_lib


@pytest.mark.parametrize(
    "shape, kernel, strides, padding, c_in, c_out",
    [
        ((40,), (5,), 2, 1, 1, 25),   # the MNIST-1D CNN's layers
        ((10,), (3,), 2, 1, 25, 25),
        ((8, 8), (3, 3), 1, 1, 1, 8),  # the digits CNN's layers
        ((8, 8), (3, 3), 2, 1, 8, 16),
        ((9, 7), (3, 2), (2, 1), (1, 0), 3, 4),  # uneven kernel, stride, padding
    ],
)
def test_conv_equals_flax_linen_conv(shape, kernel, strides, padding, c_in, c_out):
  key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (3, *shape, c_in))
  pads = (padding,) * len(shape) if isinstance(padding, int) else padding
  layer = nn.Conv(c_out, kernel, strides=strides, padding=[(p, p) for p in pads])
  params = layer.init(key_p, x)["params"]
  params = {**params, "bias": jax.random.normal(key_p, params["bias"].shape)}
  want = layer.apply({"params": params}, x)
  got = cnn.conv(x, params["kernel"], params["bias"], strides=strides,
                 padding=padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Gradients agree too (the backward pass of strided slices).
  no_bias = nn.Conv(c_out, kernel, strides=strides, use_bias=False,
                    padding=[(p, p) for p in pads])

  def ours(k):
    return jnp.sum(jnp.sin(cnn.conv(x, k, strides=strides, padding=padding)))

  def theirs(k):
    return jnp.sum(jnp.sin(no_bias.apply({"params": {"kernel": k}}, x)))

  np.testing.assert_allclose(jax.grad(ours)(params["kernel"]),
                             jax.grad(theirs)(params["kernel"]),
                             rtol=1e-4, atol=1e-4)


def test_cnn_models_output_shapes():
  for model, features, flat in ((cnn.mnist1d_cnn(), 40, 125),
                                (cnn.digits_cnn(), 64, 64)):
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert params["dense"]["w"].shape == (flat, 10)
    out = jax.eval_shape(model.apply, params, jnp.ones((5, features)))
    assert out.shape == (5, 10)


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.4, 1.0])
def test_label_noise_flips_exactly_round_p_n(rate):
  labels = np.arange(1001) % 10
  noisy = noise.noisy_labels(labels, rate, 10, seed=3)
  flipped = noisy != labels
  assert flipped.sum() == round(rate * labels.size)
  assert noisy.min() >= 0 and noisy.max() < 10
  np.testing.assert_array_equal(noisy, noise.noisy_labels(labels, rate, 10, seed=3))
  if 0 < rate < 1:
    assert not np.array_equal(noisy, noise.noisy_labels(labels, rate, 10, seed=4))


def test_digits_loader_splits_and_standardizes():
  ds = data_lib.load_digits(250)
  assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (947, 250, 600)
  assert ds.x_train.shape[1] == 64 and ds.num_classes == 10
  np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
  assert np.array_equal(ds.y_train, ds.y_train_clean)


def test_rho_warmup_is_optax_linear_schedule():
  h = {"rho": jnp.float32(0.5), "rho_warmup": jnp.float32(40.0)}
  sched = gen.rho_value(h)
  ref = optax.linear_schedule(0.0, 0.5, 40)
  for count in (0, 1, 20, 39, 40, 100):
    assert float(sched(jnp.int32(count))) == pytest.approx(float(ref(count)))
  constant = gen.rho_value({"rho": jnp.float32(0.5), "rho_warmup": jnp.float32(0)})
  assert float(constant(jnp.int32(0))) == pytest.approx(0.5)


def test_optimizers_share_the_base_and_msam_is_evaluated_unperturbed():
  assert gen.make_optimizer("msam").eval_params is sam_optax.msam_unperturbed
  assert all(gen.make_optimizer(k).eval_params is None
             for k in gen.VARIANTS if k != "msam")
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 0.5)}
  h = {"lr": 0.1, "wd": 0.0, "rho": 0.0}
  loss_fn = lambda p: jnp.sum(p["w"] ** 2)
  want = gen.make_optimizer("sgd").make(h, 10)
  want = want.update(grads, want.init(params), params)[0]
  for key, v in gen.VARIANTS.items():  # rho = 0: the base optimizer
    if not v.is_base_at_rho_zero:
      continue
    tx = gen.make_optimizer(key).make(h, 10)
    got = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, err_msg=key)


def test_lookbehind_steps_the_shared_base_k_times_over_k_times_the_schedule():
  # At rho = 0 every inner gradient is the one at w: the fast weights take k
  # steps of the shared base (its cosine spread over k x 10 steps), and the
  # slow weights move alpha = 0.5 of the way.
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  loss_fn = lambda p: jnp.sum(p["w"] ** 4)
  h = {"lr": 0.1, "wd": 0.01, "rho": 0.0}
  g = jax.grad(loss_fn)(params)
  base = gen.sgd_base(h, gen.LOOKBEHIND_K * 10)
  state, fast = base.init(params), params
  for _ in range(gen.LOOKBEHIND_K):
    u, state = base.update(g, state, fast)
    fast = optax.apply_updates(fast, u)
  want = 0.5 * (fast["w"] - params["w"])
  tx = gen.make_optimizer("lookbehind").make(h, 10)
  got = tx.update(g, tx.init(params), params, loss_fn=loss_fn)[0]
  np.testing.assert_allclose(got["w"], want, rtol=1e-6)


def test_bsam_models_the_training_set_and_its_weight_decay():
  # bSAM's prior pull delta = prior_precision / N is the grid's weight decay.
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  h = {"lr": 0.1, "wd": 0.01, "rho": 0.0}
  n = 400
  tx = gen.make_optimizer("bsam", num_data=n).make(h, 10)
  state = tx.init(params)
  assert float(state.num_data) == n
  # A zero loss: the momentum gets delta m alone, the step -lr (1 - b1) delta m / s.
  zero = lambda p: 0.0 * jnp.sum(p["w"])
  got = tx.update(jax.tree.map(jnp.zeros_like, params), state, params,
                  loss_fn=zero)[0]
  np.testing.assert_allclose(got["w"], -0.1 * 0.1 * 0.01 * params["w"], rtol=1e-5)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """Two parts run one after the other into one JSON (digits runs the same code)."""
  out = tmp_path_factory.mktemp("generalization")
  gen.main(["--quick", "--part", "mnist1d", "--out", str(out), "--no-progress"])
  result = gen.main(["--quick", "--part", "stability", "--out", str(out),
                     "--no-progress"])
  return out, result


def _settings(result):
  for name in ("mnist1d", "digits"):
    if name not in result["parts"]:
      continue
    for model_name, m in result["parts"][name]["models"].items():
      for nk, entry in m["noise"].items():
        yield name, model_name, nk, entry


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_run_structure_and_pairing(quick):
  out, result = quick
  saved = json.loads((out / gen.JSON_NAME).read_text())
  assert saved["settings"] == result["settings"]
  assert saved == result
  assert set(saved["parts"]) == {"mnist1d", "stability"}
  for png in ("generalization_compute.png", "generalization_stability.png"):
    assert (out / png).stat().st_size > 10_000
  n_train = {"mnist1d": saved["parts"]["mnist1d"]["data"]["n_train"]}
  keys = [*saved["settings"]["optimizers"], gen.SGD_2X]
  for name, _, nk, entry in _settings(saved):
    assert set(entry) == set(keys)
    # Paired: same labels, initialization and batch order for every optimizer.
    prints = {k: entry[k]["fingerprints"] for k in keys}
    assert len({tuple(v) for v in prints.values()}) == 1
    assert len(set(prints["sgd"])) == len(prints["sgd"])  # seeds differ
    # Exactly round(p * N) flipped training labels in every group.
    want = round(int(nk) / 100 * n_train[name])
    for k in keys:
      assert entry[k]["label_flips"] == [want] * len(saved["settings"]["seeds"])
    sgd = entry["sgd"]["tuned"]
    for k in keys:
      tuned = entry[k]["tuned"]
      assert all(0.0 <= a <= 1.0 for a in tuned["test_acc"]["per_seed"])
      if k == "sgd":
        continue
      diff = tuned["vs_sgd"]["per_seed"]
      assert diff == pytest.approx(np.subtract(
          tuned["test_acc"]["per_seed"], sgd["test_acc"]["per_seed"]).tolist())
      if k != gen.SGD_2X:
        # Drop-in: SGD's lr and weight decay, rho from validation.
        dropin = entry[k]["dropin"]["hparams"]
        assert dropin["lr"] == pytest.approx(sgd["hparams"]["lr"])
        assert dropin["wd"] == pytest.approx(sgd["hparams"]["wd"])
    if nk == "0":
      assert sgd["fit_noisy"] is None
    else:
      assert 0.0 <= sgd["fit_noisy"]["mean"] <= 1.0
  costs = saved["parts"]["mnist1d"]["models"]["MLP"]["costs"]
  assert 1.9 < costs["sam"]["flops_ratio"] < 2.1
  st = saved["parts"]["stability"]
  for row in st["rows"]:
    prints = {tuple(e["fingerprints"]) for e in row["noise"].values()}
    assert len(prints) == len(row["noise"])
  first = {nk: e["fingerprints"] for nk, e in st["rows"][0]["noise"].items()}
  assert all({nk: e["fingerprints"] for nk, e in r["noise"].items()} == first
             for r in st["rows"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_rewrite_touches_only_the_marked_region(quick, tmp_path):
  out, _ = quick
  head = "# Title\n\ntext before\n\n### Generalization\n\n"
  tail = "\n\n### Measured cost\n\n<!-- variant-cost:start -->\nx\n<!-- variant-cost:end -->\n"
  readme = tmp_path / "README.md"
  readme.write_text(head + gen.START + "\nstale\n" + gen.END + tail)
  gen.main(["--quick", "--part", "none", "--out", str(out), "--readme", str(readme),
            "--no-progress"])
  text = readme.read_text()
  assert text.startswith(head + gen.START + "\n")
  assert text.endswith(gen.END + tail)
  region = text[len(head):-len(tail)]
  assert "stale" not in region
  assert "python benchmarks/generalization.py --quick" in region
  assert "CPU cores" in region and "| SGD |" in region and "Stability" in region
  # Regenerating is idempotent.
  gen.main(["--quick", "--part", "none", "--out", str(out), "--readme", str(readme),
            "--no-progress"])
  assert readme.read_text() == text
  bad = tmp_path / "bad.md"
  bad.write_text("no markers\n")
  with pytest.raises(ValueError, match="generalization"):
    gen.write_readme(bad, json.loads((out / gen.JSON_NAME).read_text()))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_add_merges_new_optimizers_and_keeps_the_stored_ones(quick, tmp_path):
  out, _ = quick
  path = tmp_path / gen.JSON_NAME
  path.write_text((out / gen.JSON_NAME).read_text())
  before = json.loads(path.read_text())
  with pytest.raises(SystemExit, match="epochs"):  # other settings: refused
    gen.main(["--add", "gcsam", "--part", "mnist1d", "--out", str(tmp_path),
              "--no-progress"])
  after = gen.main(["--quick", "--add", "gcsam", "--part", "mnist1d",
                    "--out", str(tmp_path), "--no-progress"])
  assert after == json.loads(path.read_text())
  assert after["settings"]["optimizers"] == [*before["settings"]["optimizers"], "gcsam"]
  assert after["parts"]["stability"] == before["parts"]["stability"]
  for name, model_name, nk, entry in _settings(after):
    old = before["parts"][name]["models"][model_name]["noise"][nk]
    for key in old:  # the stored optimizers are untouched, SGD's rerun recorded
      stored = {k: v for k, v in entry[key].items() if k != "sgd_rerun"}
      assert stored == old[key], key
    rerun = entry["sgd"]["sgd_rerun"]["gcsam"]
    assert rerun["test_acc"] == rerun["stored_test_acc"]  # deterministic
    assert entry["gcsam"]["tuned"]["vs_sgd"]["n"] == len(before["settings"]["seeds"])
  costs = after["parts"]["mnist1d"]["models"]["MLP"]["costs"]
  assert 1.9 < costs["gcsam"]["flops_ratio"] < 2.2
  assert "| GCSAM |" in gen.readme_region(after)
