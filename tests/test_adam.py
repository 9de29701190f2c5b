"""revhyper.adam: exact reversal, hypergradients against references, optax, errors."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revhyper


def smooth_loss(w, h, t):
  """Gradients of order 0.1, never exactly zero, depending on the step; three leaf shapes."""
  x = jnp.cos(0.7 * t.astype(jnp.float32) + jnp.arange(4.0) + 0.3)
  fit = jnp.sum((jnp.tanh(w["m"] @ x) - h) ** 2)
  return 0.2 * fit + 0.1 * jnp.sum(jnp.log(jnp.cosh(w["s"] - x[0]))) + 0.05 * jnp.sum(
      (w["t"] * x[1] - 0.5) ** 2)


PARAMS = {"s": jnp.float32(0.4), "m": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
          "t": jnp.full((1, 2, 3), -0.3, jnp.float32)}
LANES = 1 + 12 + 6


def _schedules(num_steps):
  """A grid of (b1, b2) as [T] schedules, constant and per step, to batch under vmap."""
  const = lambda b: jnp.full((num_steps,), b, jnp.float32)
  b1 = [0.0, 0.5, 0.9, 0.99, 0.9, jnp.linspace(0.5, 0.95, num_steps)]
  b2 = [0.999, 0.9, 0.999, 0.99999, 0.5, jnp.linspace(0.9, 0.9999, num_steps)]
  return (jnp.stack([const(b) if isinstance(b, float) else b for b in b1]),
          jnp.stack([const(b) if isinstance(b, float) else b for b in b2]))


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_round_trip_is_bit_exact_over_decays_shapes_and_long_runs(weight_decay):
  num_steps = 1000
  mu0 = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), PARAMS)
  nu0 = jax.tree.map(lambda x: 1e-4 * jnp.ones_like(x), PARAMS)

  @jax.jit
  @jax.vmap
  def round_trip(b1, b2):
    # min_momentum: b1 and b2 are traced; b1 = 0 is clipped to 2**-8 (8 bits a step).
    rt = revhyper.round_trip(smooth_loss, PARAMS, jnp.float32(0.2), optimizer="adam",
                             num_steps=num_steps, learning_rate=0.01, b1=b1, b2=b2,
                             weight_decay=weight_decay, mu=mu0, nu=nu0,
                             method=revhyper.Reversible(min_momentum=2**-8))
    return rt

  rt = round_trip(*_schedules(num_steps))
  np.testing.assert_array_equal(np.asarray(rt.exact), True)
  np.testing.assert_array_equal(np.asarray(rt.stats.failed), False)
  for i in range(rt.exact.shape[0]):
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], rt.initial_params), PARAMS)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], rt.initial_velocity), (mu0, nu0))
  # The low decays spill and refill many chunks per lane (b1 = 0.5: 1 bit a step, b1 = 0: 8),
  # the others few: 32 bits per chunk, two moments per weight.
  chunks_per_lane = np.asarray(rt.stats.bits_stored) / (32 * LANES * 2)
  assert np.all(chunks_per_lane[[0, 1, 4, 5]] > 8), chunks_per_lane
  np.testing.assert_allclose(rt.stats.bits_stored, rt.stats.information_bound_bits, rtol=0.01)


@pytest.mark.slow
def test_round_trip_of_the_eager_call_rebuilds_the_initial_state():
  rt = revhyper.round_trip(smooth_loss, PARAMS, jnp.float32(0.2), optimizer="adam",
                           num_steps=200, learning_rate=0.02, weight_decay=0.1)
  assert bool(rt.exact) and bool(rt.buffer_empty)
  chex.assert_trees_all_equal(rt.initial_params, PARAMS)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  chex.assert_trees_all_equal(rt.initial_velocity, (zeros, zeros))


# --- hypergradients -----------------------------------------------------------------------

def _meta(params, mu, nu, h, lr, b1, b2, eps, wd, *, method, num_steps, loss=smooth_loss):
  out = revhyper.adam(loss, params, h, num_steps=num_steps, learning_rate=lr, b1=b1, b2=b2,
                      eps=eps, weight_decay=wd, mu=mu, nu=nu, method=method)
  leaves = jax.tree.leaves(out.params)
  return (sum(jnp.sum(jnp.sin(3.0 * x)) for x in leaves)
          + 10.0 * sum(jnp.sum(x) for x in jax.tree.leaves(out.mu))
          + 100.0 * sum(jnp.sum(x) for x in jax.tree.leaves(out.nu)))


@pytest.mark.slow
def test_hypergradients_of_every_input_match_float64_unroll_and_finite_differences():
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    params = to64(PARAMS)
    mu = jax.tree.map(lambda x: 0.02 * jnp.ones_like(x), params)
    nu = jax.tree.map(lambda x: 3e-3 * jnp.ones_like(x), params)
    args = [params, mu, nu] + [jnp.float64(v) for v in (0.2, 0.03, 0.85, 0.99, 1e-3, 0.2)]

    def grads(method):
      meta = lambda *a: _meta(*a, method=method, num_steps=40)  # noqa: E731
      return jax.jit(jax.grad(meta, argnums=tuple(range(9))))(*args)

    # b1, b2 and wd are traced; check_reversal: NaN unless w_0 is rebuilt bit for bit.
    got = grads(revhyper.Reversible(min_momentum=0.5, check_reversal=True))
    # The exact method against store-all backprop of the same float64 dynamics: the grid
    # (2**-48 and finer) is all that separates them.
    for g, e in zip(got, grads("unroll")):
      g, e = jax.flatten_util.ravel_pytree(g)[0], jax.flatten_util.ravel_pytree(e)[0]
      assert float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e)) < 1e-7
    value = jax.jit(lambda *a: _meta(*a, method="unroll", num_steps=40))
    flat, unravel = jax.flatten_util.ravel_pytree(args)
    directions = np.random.default_rng(0).standard_normal((6, flat.size))
    directions = np.concatenate([directions, np.eye(flat.size)[-6:]])  # each scalar on its own
    directions *= np.abs(np.asarray(flat))  # relative steps: eps and nu are small
    got_flat = jax.flatten_util.ravel_pytree(got)[0]
    # A relative step of 1e-4: the differences' own error (curvature, and the rounding of b1,
    # b2 and lr * wd to multiples of 2**-31, which gradients pass straight through) is 1e-5.
    step = 1e-4
    for d in directions:
      d = jnp.asarray(d)
      fd = (value(*unravel(flat + step * d)) - value(*unravel(flat - step * d))) / (2 * step)
      np.testing.assert_allclose(jnp.dot(got_flat, d), fd, rtol=5e-5)


def _mnist_mlp():
  images, labels = revhyper.datasets.load_mnist()
  x = jnp.asarray(images[:1000], jnp.float32) / 255.0
  y = jnp.asarray(labels[:1000], jnp.int32)
  params = revhyper.models.mlp_init(jax.random.key(0), [784, 50, 50, 50, 10], scale=0.1)

  def loss(w, l2, t):
    start = (t % 10) * 100
    xb = jax.lax.dynamic_slice_in_dim(x, start, 100)
    yb = jax.lax.dynamic_slice_in_dim(y, start, 100)
    logits = revhyper.models.mlp_apply(w, xb)
    penalty = sum(jnp.sum(v ** 2) for v in jax.tree.leaves(w))
    return revhyper.models.softmax_cross_entropy(logits, yb) + l2 * penalty

  return params, loss


@pytest.mark.slow
def test_mlp_hypergradients_of_every_input_match_unroll():
  params, loss = _mnist_mlp()
  mu = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  nu = jax.tree.map(lambda x: 1e-6 * jnp.ones_like(x), params)
  args = [params, mu, nu] + [jnp.float32(v) for v in (1e-4, 1e-3, 0.9, 0.999, 1e-8, 0.1)]

  def grads(method):
    meta = lambda *a: _meta(*a, method=method, num_steps=100, loss=loss)  # noqa: E731
    return jax.jit(jax.grad(meta, argnums=tuple(range(9))))(*args)

  # check_reversal: a gradient path that did not rebuild w_0 bit for bit would give NaN.
  got = grads(revhyper.Reversible(min_momentum=0.5, check_reversal=True))
  expected = grads("unroll")
  for name, g, e in zip(["params", "mu", "nu", "l2", "lr", "b1", "b2", "eps", "wd"], got,
                        expected):
    g, e = jax.flatten_util.ravel_pytree(g)[0], jax.flatten_util.ravel_pytree(e)[0]
    assert np.all(np.isfinite(e)), name
    error = float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e))
    assert error <= 1e-4, (name, error)


# --- against optax --------------------------------------------------------------------------

@pytest.mark.slow
def test_trajectory_matches_optax_adamw_and_bits_meet_the_bound():
  images, labels = revhyper.datasets.load_mnist()
  x = jnp.asarray(images[:2000], jnp.float32) / 255.0
  y = jnp.asarray(labels[:2000], jnp.int32)
  params = revhyper.models.mlp_init(jax.random.key(1), [784, 20, 10], scale=0.1)

  def loss(w, h, t):
    start = (t % 20) * 100
    xb, yb = (jax.lax.dynamic_slice_in_dim(a, start, 100) for a in (x, y))
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(w, xb), yb)

  num_steps, kwargs = 1000, dict(learning_rate=3e-3, b1=0.9, b2=0.999, weight_decay=1e-2)
  optimizer = optax.adamw(**kwargs)

  @jax.jit
  def reference(params):
    def step(carry, t):
      p, state = carry
      updates, state = optimizer.update(jax.grad(loss)(p, None, t), state, p)
      return (optax.apply_updates(p, updates), state), None
    return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(num_steps))[0][0]

  expected = reference(params)
  out = revhyper.adam(loss, params, None, num_steps=num_steps, **kwargs)
  full = lambda w: revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(w, x), y)
  assert abs(float(full(out.params)) / float(full(expected)) - 1) <= 1e-4
  # b1 = 0.9, b2 = 0.999 and lr * wd = 3e-5: log2 of each decay, about 0.154 bits.
  weights = sum(v.size for v in jax.tree.leaves(params))
  bound = np.log2(1 / 0.9) + np.log2(1 / 0.999) + np.log2(1 / (1 - 3e-5))
  np.testing.assert_allclose(out.stats.bits_per_weight_per_step, bound, rtol=0.01)
  np.testing.assert_allclose(out.stats.information_bound_bits, bound * weights * num_steps,
                             rtol=1e-4)
  np.testing.assert_allclose(out.stats.bits_stored, out.stats.information_bound_bits, rtol=0.01)


# --- transformations ------------------------------------------------------------------------

@pytest.mark.slow
def test_vmap_of_jitted_hypergradients_matches_unroll():
  def objective(lr, b2, method):
    out = revhyper.adam(smooth_loss, PARAMS, jnp.float32(0.2), num_steps=150,
                        learning_rate=lr, b2=b2, weight_decay=0.1, method=method)
    return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(out.params)), out.stats

  grad = jax.jit(jax.vmap(jax.grad(objective, argnums=(0, 1), has_aux=True),
                          in_axes=(0, 0, None)), static_argnums=2)
  lrs = jnp.asarray([0.003, 0.01, 0.03], jnp.float32)
  # (b2 = 0.9999 would test float32 rather than the method: there the b2 hypergradient of
  # float32 unroll is 5e-4 from float64's, the reversible one's 2.5e-4.)
  b2s = jnp.asarray([0.9, 0.99, 0.999], jnp.float32)
  got, stats = grad(lrs, b2s, revhyper.Reversible(min_momentum=0.5, check_reversal=True))
  expected, _ = grad(lrs, b2s, "unroll")
  assert stats.bits_stored.shape == (3,) and not np.any(stats.failed)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4)


@pytest.mark.slow
def test_higher_order_derivatives_through_the_reversible_pass_raise():
  def meta(lr):
    out = revhyper.adam(smooth_loss, PARAMS, jnp.float32(0.2), num_steps=5, learning_rate=lr)
    return jnp.sum(out.params["m"])

  with pytest.raises(TypeError, match="first-order reverse mode"):
    jax.hessian(meta)(0.01)
  with pytest.raises(TypeError, match="first-order reverse mode"):
    jax.jvp(meta, (0.01,), (1.0,))


# As for sgd (tests/test_transformations.py): the state is carried at float32 or finer by every
# method; the loss's gradient, in the leaves' dtype, rounds alike only to that dtype.
@pytest.mark.parametrize("dtype,tolerance", [
    pytest.param(jnp.bfloat16, 1e-2, marks=pytest.mark.slow),
    pytest.param(jnp.float16, 1e-3, marks=pytest.mark.slow),
    (jnp.float32, 1e-4)], ids=str)
def test_dtypes_of_the_leaves_are_kept_and_the_methods_agree(dtype, tolerance):
  params = {"a": jnp.full((8, 4), 0.1, dtype), "b": jnp.full((4,), 0.2, dtype)}

  def loss(w, h, t):
    x = jnp.cos(jnp.arange(8.0) + t.astype(jnp.float32))
    a, b = w["a"].astype(jnp.float32), w["b"].astype(jnp.float32)
    return jnp.sum((jnp.tanh(x @ a) * b - h) ** 2)

  def objective(h, lr, method):
    out = revhyper.adam(loss, params, h, num_steps=60, learning_rate=lr, method=method)
    assert out.params["a"].dtype == dtype and out.nu["b"].dtype == dtype
    return jnp.sum(out.params["b"].astype(jnp.float32) ** 2)

  grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=2)
  got = np.asarray(jax.tree.leaves(grad(jnp.float32(0.3), jnp.float32(0.01), "reversible")))
  want = np.asarray(jax.tree.leaves(grad(jnp.float32(0.3), jnp.float32(0.01), "unroll")))
  np.testing.assert_allclose(got, want, rtol=tolerance)


# --- errors ---------------------------------------------------------------------------------

def _adam(**overrides):
  kwargs = dict(num_steps=5, learning_rate=0.01)
  kwargs.update(overrides)
  return revhyper.adam(smooth_loss, PARAMS, jnp.float32(0.2), **kwargs)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(b1=1.5), r"b1 must lie in \[0, 1\]"),
    (dict(b2=-0.1), r"b2 must lie in \[0, 1\]"),
    (dict(b2=jnp.ones(4)), r"b2 must be a scalar or have shape"),
    (dict(b1={"m": 0.9}), r"b1 must be a scalar, a \[num_steps\] array, or a pytree"),
    (dict(eps=-1e-8), r"eps must be finite and at least 0"),
    (dict(eps_root=np.inf), r"eps_root must be finite"),
    (dict(learning_rate=np.nan), r"learning_rate must be finite"),
    (dict(weight_decay=-1.0), r"learning_rate \* weight_decay must lie in \[0, 1\]"),
    (dict(weight_decay=200.0), r"learning_rate \* weight_decay must lie in \[0, 1\]"),
    (dict(nu=jax.tree.map(lambda x: -jnp.ones_like(x), PARAMS)), r"nu must be non-negative"),
    (dict(mu={"m": jnp.zeros((3, 4))}), r"mu must have the structure of params"),
    (dict(mu=jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float16), PARAMS)),
     r"mu leaves must match params"),
    (dict(num_steps=0), r"num_steps must be at least 1"),
    (dict(method="adjoint"), r"method must be one of"),
])
def test_bad_arguments_raise_a_value_error_naming_them(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    _adam(**overrides)


def test_traced_decays_need_min_momentum_and_a_diverging_run_raises():
  with pytest.raises(ValueError, match=r"Reversible\(min_decay=\.\.\.\)"):
    jax.jit(lambda b1: _adam(b1=b1).params)(0.9)
  # A squared gradient of 25 cannot stay on the second moment's grid (nu < 2).
  steep = lambda w, h, t: 5.0 * jnp.sum(w)
  with pytest.raises(revhyper.ReversalError, match="fixed-point overflow.*0 <= nu < 2"):
    revhyper.adam(steep, jnp.zeros(3), None, num_steps=2000, learning_rate=1e-3)
  out = jax.jit(lambda w: revhyper.adam(steep, w, None, num_steps=2000, learning_rate=1e-3))(
      jnp.zeros(3))
  assert bool(out.stats.fixed_point_overflow) and np.all(np.isnan(out.params))


def test_momentum_like_clipping_of_b1_zero_warns():
  with pytest.warns(UserWarning, match="b1 rounds to a factor below 2\\*\\*-8"):
    out = _adam(b1=0.0)
  assert not bool(out.stats.failed)
