"""The precision of the loss's matrix products: the same program on every backend.

A GPU's default float32 products use TF32 and make methods disagree; revhyper traces the loss
under ``precision="highest"`` by default for every method. The CPU compiles the same StableHLO
that a GPU receives, so these tests fix the semantics where a GPU would run them.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import revhyper

W = {"a": jnp.full((4, 3), 0.1), "b": jnp.full((3,), 0.2)}
X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def loss_fn(w, h, t):
  return jnp.sum(jnp.tanh(X @ w["a"] + h * t) @ w["b"])


def _precisions(method, ambient=None, train=False):
  """The precisions of every dot in the lowered hypergradient program."""
  def meta(h):
    if train:
      out = revhyper.train(loss_fn, W, h, revhyper.optim.adam(0.01), num_steps=3, method=method)
    else:
      out = revhyper.sgd(loss_fn, W, h, num_steps=3, learning_rate=0.1, momentum=0.9,
                         method=method)
    return jnp.sum(out.params["b"])

  if ambient is None:
    text = jax.jit(jax.grad(meta)).lower(0.1).as_text()
  else:
    with jax.default_matmul_precision(ambient):
      text = jax.jit(jax.grad(meta)).lower(0.1).as_text()
  found = re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", text)
  assert found, "no matrix product in the program"
  return {p for pair in found for p in pair}


@pytest.mark.parametrize("method", [revhyper.Reversible(), revhyper.Unroll(),
                                    revhyper.Checkpoint()], ids=lambda m: type(m).__name__)
def test_every_product_is_highest_by_default_forward_and_backward(method):
  assert _precisions(method) == {"HIGHEST"}


def test_train_uses_the_methods_precision_too():
  assert _precisions(revhyper.Reversible(), train=True) == {"HIGHEST"}
  assert _precisions(revhyper.Unroll(precision="default"), train=True) == {"DEFAULT"}


def test_precision_none_follows_the_callers_setting():
  assert _precisions(revhyper.Reversible(precision=None)) == {"DEFAULT"}
  assert _precisions(revhyper.Reversible(precision=None), ambient="highest") == {"HIGHEST"}
  # An explicit precision wins over the caller's.
  assert _precisions(revhyper.Reversible(precision="high"), ambient="highest") == {"HIGH"}


def test_a_product_that_names_its_own_precision_keeps_it():
  def own(w, h, t):
    return jnp.sum(jnp.dot(X, w["a"], precision=jax.lax.Precision.DEFAULT) @ w["b"]) * h

  text = jax.jit(jax.grad(lambda h: jnp.sum(revhyper.sgd(
      own, W, h, num_steps=2, learning_rate=0.1, momentum=0.9).params["b"]))).lower(
          0.1).as_text()
  found = set(re.findall(r"precision = \[(\w+), \w+\]", text))
  assert "DEFAULT" in found and "HIGHEST" in found


def test_bad_precision_names_the_argument():
  for cls in (revhyper.Reversible, revhyper.Unroll, revhyper.Checkpoint):
    with pytest.raises(ValueError, match="precision must be None or one of"):
      cls(precision="fastest")
