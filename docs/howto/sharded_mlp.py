"""An MLP whose hidden units are split over devices; the exact state follows the weights.

On a machine with one device the mesh has one device and the script runs as is; on a CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts) simulates 8.
"""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

import revhyper

# jax.make_mesh's axes are Explicit: the layout is part of each array's type.
devices = len(jax.devices())
mesh = jax.make_mesh((devices,), ("model",))
specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = {"w1": 0.3 * jax.random.normal(k1, (16, 64 * devices)), "b1": jnp.zeros(64 * devices),
          "w2": 0.03 * jax.random.normal(k2, (64 * devices, 4)), "b2": jnp.zeros(4)}
params = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
x = jax.random.normal(k3, (512, 16))
y = jnp.sin(x[:, :4])


def mse(p, xb, yb):
  hidden = jnp.tanh(xb @ p["w1"] + p["b1"])  # each device computes its own hidden units
  # A product over the split units: with Explicit axes JAX asks for the output's layout.
  out = jnp.einsum("bh,ho->bo", hidden, p["w2"], out_sharding=NamedSharding(mesh, P()))
  return jnp.mean((out + p["b2"] - yb) ** 2)


def train_loss(p, l2, t):
  idx = revhyper.datasets.batch_indices(jax.random.key(1), t, 384, 32)
  # revhyper differentiates arrays the loss closes over, the data too; with Explicit axes the
  # data's gradient is a product over the split units, which JAX cannot lay out by itself.
  xb, yb = jax.lax.stop_gradient((x[idx], y[idx]))
  return mse(p, xb, yb) + l2 * jnp.sum(p["w1"] ** 2)


def validation_loss(l2, params, method):
  out = revhyper.sgd(train_loss, params, l2, num_steps=50, learning_rate=0.1, momentum=0.9,
                     method=method)
  return mse(out.params, x[384:], y[384:])


# Reversible() takes the layout from the parameters' types; Reversible(mesh=mesh,
# param_specs=specs) gives it explicitly (and is how an Auto mesh is given one).
hypergradient = jax.jit(jax.grad(validation_loss), static_argnums=2)
exact = hypergradient(jnp.float32(1e-3), params, revhyper.Reversible())
given = hypergradient(jnp.float32(1e-3), params,
                      revhyper.Reversible(mesh=mesh, param_specs=specs))
backprop = hypergradient(jnp.float32(1e-3), params, "unroll")


def relative_error(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


error = max(relative_error(exact, backprop), relative_error(given, backprop))
print(f"{devices} device(s); hypergradient: {float(exact):.6g}")
print("relative error against unroll:", error)
assert error <= 1e-5, error
