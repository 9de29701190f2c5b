"""Hypergradients of every input agree across methods and with finite differences."""

import functools
import importlib.resources

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper

# The momentum is differentiated under jit, hence traced: the bit stack needs a static bound.
REVERSIBLE = revhyper.Reversible(min_momentum=0.4)
METHODS = [REVERSIBLE, "checkpoint", revhyper.Checkpoint(segment_length=1),
           revhyper.Reversible(min_momentum=0.4, share_gradient=False)]


def rel_err(a, b):
  a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def loss_fn(w, h, t):
  target = h["target"] * (1.0 + 0.05 * jnp.cos(t.astype(h["target"].dtype)))
  return (jnp.sum(h["l2"] * w["a"] ** 2) + jnp.sum((w["a"] - target) ** 2)
          + 0.1 * jnp.sum(w["a"] ** 4) + jnp.sum(jnp.log(jnp.cosh(w["b"] - 0.3))))


def problem(dtype=jnp.float32):
  params = {"a": jnp.linspace(-1.0, 1.5, 6, dtype=dtype), "b": jnp.full((2, 2), 0.8, dtype)}
  velocity = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  hparams = {"l2": jnp.full((6,), 0.2, dtype), "target": jnp.asarray(0.5, dtype)}
  num_steps = 40
  lr = {"a": jnp.linspace(0.05, 0.02, num_steps, dtype=dtype), "b": jnp.asarray(0.1, dtype)}
  mom = {"a": jnp.asarray(0.9, dtype), "b": jnp.linspace(0.5, 0.95, num_steps, dtype=dtype)}
  return params, velocity, hparams, lr, mom, num_steps


def meta_loss(params, velocity, hparams, lr, mom, num_steps, method):
  out = revhyper.sgd(loss_fn, params, hparams, num_steps=num_steps, learning_rate=lr,
                     momentum=mom, velocity=velocity, method=method)
  return (jnp.sum(jnp.sin(out.params["a"])) + jnp.sum(out.params["b"] ** 2)
          + 0.3 * jnp.sum(out.velocity["a"]))


# One jitted function for the module: the unroll reference, which every method is compared
# with, compiles once per dtype rather than once per test.
_ALL_GRADS = jax.jit(jax.grad(meta_loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5, 6))


def all_grads(method, dtype=jnp.float32):
  params, velocity, hparams, lr, mom, num_steps = problem(dtype)
  return _ALL_GRADS(params, velocity, hparams, lr, mom, num_steps, method)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_input_gradient_agrees_with_unroll(method):
  expected = all_grads("unroll")
  got = all_grads(method)
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    e = functools.reduce(lambda x, k: x[k.idx if hasattr(k, "idx") else k.key], path, expected)
    assert rel_err(g, e) < 1e-4, (jax.tree_util.keystr(path), rel_err(g, e))


@pytest.mark.slow
def test_gradients_match_central_finite_differences_in_float64():
  with jax.enable_x64(True):
    params, velocity, hparams, lr, mom, num_steps = problem(jnp.float64)
    grads = all_grads(REVERSIBLE, jnp.float64)

    def f(params=params, velocity=velocity, hparams=hparams, lr=lr, mom=mom):
      return float(meta_loss(params, velocity, hparams, lr, mom, num_steps, "unroll"))

    def central(name, tree, leaf, index, step):
      def shifted(sign):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        leaves[leaf] = jnp.asarray(leaves[leaf]).at[index].add(sign * step)
        return f(**{name: jax.tree_util.tree_unflatten(treedef, leaves)})
      return (shifted(1) - shifted(-1)) / (2 * step)

    checks = [("params", 0, 0, 1e-5), ("params", 1, (1, 0), 1e-5), ("velocity", 0, 3, 1e-5),
              ("hparams", 0, 2, 1e-5), ("hparams", 1, (), 1e-5), ("lr", 0, 5, 1e-6),
              ("lr", 1, (), 1e-6),
              # Momenta are rounded to multiples of 2**-16: step by an exact multiple.
              ("mom", 0, (), 2.0**-12), ("mom", 1, 7, 2.0**-12)]
    names = ["params", "velocity", "hparams", "lr", "mom"]
    trees = dict(params=params, velocity=velocity, hparams=hparams, lr=lr, mom=mom)
    for name, leaf, index, step in checks:
      fd = central(name, trees[name], leaf, index, step)
      analytic = float(jax.tree_util.tree_leaves(grads[names.index(name)])[leaf][index])
      np.testing.assert_allclose(analytic, fd, rtol=2e-5, atol=1e-8, err_msg=name)


@pytest.mark.slow
def test_closed_over_arrays_get_gradients():
  params, velocity, hparams, lr, mom, num_steps = problem()

  def meta(target, method):
    def closing_loss(w, h, t):
      return loss_fn(w, {"l2": h, "target": target}, t)
    out = revhyper.sgd(closing_loss, params, hparams["l2"], num_steps=num_steps,
                       learning_rate=lr, momentum=mom, method=method)
    return jnp.sum(out.params["a"] ** 2)

  expected = jax.grad(meta)(0.5, "unroll")
  np.testing.assert_allclose(jax.grad(meta)(0.5, "reversible"), expected, rtol=1e-4)
  np.testing.assert_allclose(jax.jit(jax.grad(meta), static_argnums=1)(0.5, "reversible"),
                             expected, rtol=1e-4)


@pytest.mark.slow
def test_vmap_over_hyperparameter_settings_matches_a_loop_of_unroll():
  params, velocity, hparams, _, _, num_steps = problem()

  def meta(lr, method="reversible"):
    out = revhyper.sgd(loss_fn, params, hparams, num_steps=num_steps, learning_rate=lr,
                       momentum=0.9, method=method)
    return jnp.sum(out.params["a"] ** 2)

  lrs = jnp.asarray([0.01, 0.03, 0.1], jnp.float32)
  batched = jax.jit(jax.vmap(jax.value_and_grad(meta)))(lrs)
  for i, lr in enumerate(lrs):
    value, grad = jax.value_and_grad(meta)(lr, "unroll")
    np.testing.assert_allclose(batched[0][i], value, rtol=1e-6)
    np.testing.assert_allclose(batched[1][i], grad, rtol=1e-5)


def test_jit_does_not_retrace_across_hyperparameter_values():
  params, velocity, hparams, lr, mom, num_steps = problem()
  traces = []

  def counting_loss(w, h, t):
    traces.append(None)
    return loss_fn(w, h, t)

  @jax.jit
  def meta(h, lr, mom):
    out = revhyper.sgd(counting_loss, params, h, num_steps=num_steps, learning_rate=lr,
                       momentum=mom, method=revhyper.Reversible(min_momentum=0.4))
    return jnp.sum(out.params["a"] ** 2)

  step = jax.grad(meta, argnums=(0, 1, 2))
  jax.block_until_ready(step(hparams, lr, mom))
  count = len(traces)
  for scale in [1.1, 0.9, 1.3]:
    moved = jax.tree.map(lambda x, s=scale: x * s, (hparams, lr))
    jax.block_until_ready(step(*moved, jax.tree.map(lambda m: m * 0.99, mom)))
  assert len(traces) == count


@pytest.mark.slow
def test_x64_enabled_float64_gradients_agree_with_unroll():
  with jax.enable_x64(True):
    expected = all_grads("unroll", jnp.float64)
    got = all_grads(REVERSIBLE, jnp.float64)
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
      assert g.dtype == jnp.float64
      # float64 training is finer than the 2**-48 grid, whose rounding then dominates.
      assert rel_err(g, e) < 1e-7


def test_x64_enabled_float32_params_keep_float32():
  with jax.enable_x64(True):
    got = all_grads(REVERSIBLE, jnp.float32)
  for g in jax.tree_util.tree_leaves(got):
    assert g.dtype == jnp.float32


# --- the paper's network ------------------------------------------------------------------

def _mnist(num):
  path = importlib.resources.files("revhyper") / "data_files" / "mnist10k.npz"
  with path.open("rb") as f:
    data = np.load(f)
    images, labels = data["images"][:num], data["labels"][:num]
  x = images.astype(np.float32) / 255.0
  return jnp.asarray(x - x.mean(0)), jnp.asarray(labels, jnp.int32)


@pytest.mark.slow
def test_mlp_hypergradients_agree_with_unroll():
  """784-50-50-50-10 tanh MLP, batch 200, T = 100: per-layer per-step schedules, init scales."""
  x, y = _mnist(1000)
  sizes, batch, num_steps = [784, 50, 50, 50, 10], 200, 100
  keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
  noise = [{"W": jax.random.normal(k, (m, n), jnp.float32), "b": jax.random.normal(
      jax.random.fold_in(k, 1), (n,), jnp.float32)} for k, m, n in zip(keys, sizes, sizes[1:])]

  def train_loss(w, h, t):
    start = (t * batch) % x.shape[0]
    xb = jax.lax.dynamic_slice_in_dim(x, start, batch)
    yb = jax.lax.dynamic_slice_in_dim(y, start, batch)
    a = xb
    for layer in w[:-1]:
      a = jnp.tanh(a @ layer["W"] + layer["b"])
    logits = a @ w[-1]["W"] + w[-1]["b"]
    nll = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, yb[:, None], 1)[:, 0])
    return nll + h * sum(jnp.sum(layer["W"] ** 2) for layer in w)

  def meta(hyper, method):
    params = jax.tree.map(lambda z, s: jnp.exp(s) * z, noise, hyper["log_init"])
    out = revhyper.sgd(train_loss, params, hyper["l2"], num_steps=num_steps,
                       learning_rate=jax.tree.map(jnp.exp, hyper["log_lr"]),
                       momentum=jax.tree.map(jax.nn.sigmoid, hyper["logit_mom"]), method=method)
    return train_loss(out.params, 0.0, jnp.int32(num_steps))

  per_leaf = lambda v: jax.tree.map(lambda _: jnp.full((num_steps,), v, jnp.float32), noise)
  hyper = {"log_lr": per_leaf(-1.0), "logit_mom": per_leaf(0.0),
           "log_init": jax.tree.map(lambda _: jnp.float32(-3.0), noise), "l2": jnp.float32(1e-4)}
  grad = jax.jit(jax.grad(meta), static_argnums=1)
  expected = grad(hyper, "unroll")
  got = grad(hyper, revhyper.Reversible(min_momentum=0.3))
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    e = functools.reduce(lambda t, k: t[k.idx if hasattr(k, "idx") else k.key], path, expected)
    assert rel_err(g, e) < 1e-4, (jax.tree_util.keystr(path), rel_err(g, e))
  chex.assert_tree_all_finite(got)
