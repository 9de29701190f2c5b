"""Write a new optimizer as a revhyper.optim.Rule: AdaBelief from scratch, checked three ways."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

import revhyper
from revhyper import optim


@dataclasses.dataclass(frozen=True)  # a rule is static configuration: it must hash by value
class MyAdaBelief(optim.Rule):
  """AdaBelief (Zhuang et al. 2020): Adam whose second moment tracks (g - mu)**2."""

  coefficients = (optim.Coefficient("learning_rate"),
                  optim.Coefficient("b1", "decay"), optim.Coefficient("b2", "decay"),
                  optim.Coefficient("eps", "nonnegative"),
                  optim.Coefficient("eps_root", "nonnegative"))
  # Every state decays by one of the "decay" coefficients; the increments are added in this
  # order, so nu's increment reads the mu of this step.
  states = (optim.State("mu", decay="b1", fractional_bits=56),
            optim.State("nu", decay="b2", fractional_bits=60, nonnegative=True))

  def schedules(self, c):
    # Whole [T] schedules of one leaf: the bias corrections 1 - prod_{s <= t} b_s.
    # c.one_minus_b1 is 1 - b1 kept exactly (1 - b1 in float32 is not, for b1 near 1).
    return {"c1": -jnp.expm1(jnp.cumsum(jnp.log1p(-c.one_minus_b1))),
            "c2": -jnp.expm1(jnp.cumsum(jnp.log1p(-c.one_minus_b2)))}

  def increment(self, name, c, g, s):
    if name == "mu":
      return c.one_minus_b1 * g
    return c.one_minus_b2 * (g - s.mu) ** 2 + c.eps_root

  def weight_step(self, c, s, g, previous):
    # Reads only the states after the step, never g or previous: that is what makes the
    # step run backwards exactly.
    return -c.learning_rate * (s.mu / c.c1) / (jnp.sqrt(s.nu / c.c2) + c.eps)


def my_adabelief(learning_rate, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16):
  return optim.Optimizer((MyAdaBelief(),), (dict(learning_rate=learning_rate, b1=b1, b2=b2,
                                                  eps=eps, eps_root=eps_root),))


# A small regression; the minibatch is a pure function of the step t.
rng = np.random.default_rng(0)
x, y = jnp.asarray(rng.standard_normal((64, 5)), jnp.float32), jnp.asarray(
    rng.standard_normal(64), jnp.float32)
params = {"w": jnp.asarray(0.3 * rng.standard_normal((5, 4)), jnp.float32),
          "v": jnp.asarray(0.3 * rng.standard_normal(4), jnp.float32)}


def loss_fn(p, l2, t):
  rows = (jnp.arange(16) + 16 * (t % 4)) % 64
  return jnp.mean((jnp.tanh(x[rows] @ p["w"]) @ p["v"] - y[rows]) ** 2) + l2 * jnp.sum(p["w"] ** 2)


# 1. check_rule: forward and backwards exactly, and reversible against unrolled hypergradients.
check = optim.check_rule(my_adabelief(0.01))
print("check_rule:", check.round_trip_exact, f"bits / bound {check.bits_over_bound:.4f}")
assert check.ok, check


# 2. The same dynamics, bit for bit, as the built-in AdaBelief (which mirrors optax's).
mine = revhyper.train(loss_fn, params, 1e-3, my_adabelief(0.01), num_steps=200)
builtin = revhyper.train(loss_fn, params, 1e-3, optim.adabelief(0.01), num_steps=200)
chex.assert_trees_all_equal(mine.params, builtin.params)


# 3. Hypergradients of a validation loss with respect to a per-step learning-rate schedule
#    and the L2 penalty, by exact reversal and by store-all backprop.
def validation_loss(lrs, l2, method):
  out = revhyper.train(loss_fn, params, l2, my_adabelief(lrs), num_steps=200, method=method)
  return jnp.mean((jnp.tanh(x @ out.params["w"]) @ out.params["v"] - y) ** 2)


hypergradient = jax.jit(jax.grad(validation_loss, argnums=(0, 1)), static_argnums=2)
lrs = jnp.full(200, 0.01)
got, want = hypergradient(lrs, 1e-3, "reversible"), hypergradient(lrs, 1e-3, "unroll")
for name, a, b in zip(("learning-rate schedule", "L2 penalty"), got, want):
  error = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  print(f"{name}: relative error against unroll {error:.1e}")
  assert error < 1e-5
