"""Hyperparameter optimisers at equal compute: do exact hypergradients find better models?

Every contender tunes the same training runs with the same compute, counted in training-run
equivalents, and every one is scored the same way: what it found trains ``config.eval_seeds``
fresh seeds (initial weights and minibatch order never used in the search) and is measured on
a test split never used in the search (the bundled 10,000 digits split train / valid / test).

Tasks (``config.tasks``, "model:optimizer:steps"): the paper's 784-50-50-50-10 tanh MLP with
momentum SGD for T = 100 and T = 1000 steps, the same MLP with AdamW (T = 100), and a small
convnet without BatchNorm (3x3 stride-2 tanh convolutions, then a linear layer) with momentum
SGD. Every task tunes the learning rate, the momentum (AdamW: b1), the decoupled weight decay
and the init scale (a multiple of 1 / sqrt(fan in)); b2 = 0.999 and eps_root = 1e-8.

Contenders:

* ``random_constant``, ``random_warmup_cosine``: random search over the four values, a
  constant learning rate or a warmup-cosine schedule with that peak; one training run per trial
  (``config.search_seeds``), the best by validation error.
* ``tpe_constant``, ``tpe_warmup_cosine``: the same spaces searched by Optuna's TPE sampler.
* ``hypergradient_descent``: online, greedy, one-step hypergradients of one global learning
  rate (Baydin et al. 2018, the multiplicative form: log lr moves by -beta times the cosine of
  this step's gradient and the previous step's derivative of the weights in lr); one pass is
  one training run, each beta of ``config.hd_betas`` in turn, the best by validation error. It
  is scored as it runs: online on each fresh seed.
* ``truncated``: short-horizon hypergradients of free per-step schedules (log lr, logit
  momentum, log weight decay for every step and weight type): each window of
  ``config.window`` steps is differentiated for the validation minibatch loss at its end,
  starting from where training reached; one pass gives every window's hypergradient and one
  meta-step.
* ``hypergradient``: full-horizon exact hypergradients through the whole training run
  (``revhyper.sgd`` / ``revhyper.adam`` run backwards) of the same free per-step schedules and
  per-weight-type init scales, one seed per meta-iteration, as in the paper.
* ``hypergradient_smooth``: full-horizon exact hypergradients of a smooth family, warmup-cosine
  with learned peak, momentum, weight decay and init scale, times exp of ``config.num_basis``
  cosine basis functions of t per weight type; averaged over ``config.avg_seeds`` seeds
  (their spread across seeds is recorded: ``revhyper.meta.hypergradient_variance``), with
  meta-step ``config.smooth_meta_step``.
* ``tpe_then_hypergradient``: TPE over the warmup-cosine family for
  ``config.warm_start_fraction`` of the budget, then ``hypergradient_smooth``'s meta-steps from
  the best point it found.

The gradient-based contenders all meta-step with ``optax.adam(config.meta_step)`` after
``revhyper.meta.clip_hypergradient(config.max_hypergrad_norm)``, which also turns the
hypergradient of a diverged run into no step; with ``config.meta_step_decay`` (the default)
the step decays along a cosine to 0 over the meta-steps the budget affords them; with
``config.keep_best`` (the default), each offers the point with the lowest validation loss it has
evaluated so far, as the searches offer their best trial. They start at the defaults of the
config; the searches sample the whole space. ``config.contenders`` runs only some of them.

Compute: one training run is the time of one jit-compiled training run and its evaluation,
measured in this run (after compiling); every other unit of work (one hypergradient, one
hypergradient-descent pass, one truncated pass) costs its own measured time over that one.
Each contender gets ``config.budget_runs`` of these per task, and is scored on held-out seeds
when it has spent each fraction in ``config.checkpoints`` of it.

Outputs in ``--out_dir``: ``results.json`` (the shared schema of experiments/common.py; then
``tasks[<task>]`` with the measured costs, the seconds of one training run, the hypergradient
spread across seeds, the verdict, and ``contenders[<name>]`` with ``compute_runs``,
``test_error`` and ``valid_error`` as ``{"mean", "sd", "n", "values"}``, the held-out ``curve``
and what was ``found``) and ``hpo_benchmark.png``: best-found held-out test error against
compute, per task, with bands of one sd over the fresh seeds; both are rewritten after every
task, so a partial run keeps what it finished. Wall time of the paper preset on 2 quiet CPU
cores: 2.6 minutes for each T = 100 MLP task, 15 for the convnet and 18 for T = 1000, 38 in all
(docs/hpo.rst).

Run from the repository root::

  python experiments/hpo_benchmark.py --out_dir results/hpo   # ~40 min on 2 CPU cores
  python experiments/hpo_benchmark.py --config=experiments/configs/hpo_benchmark.py:quick \\
      --out_dir /tmp/hpo_quick                                  # under 60 CPU-seconds
"""

import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

# `common` sits beside this script; make it importable when run from the repository root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (needs the path above)
import matplotlib.pyplot as plt  # noqa: E402  (common chooses the headless backend first)
import revhyper  # noqa: E402

FLAGS = flags.FLAGS
EXPERIMENT = "hyperparameter optimisers at equal compute"
DEPARTURES = (
    "Not a figure of the paper: a benchmark of hyperparameter optimisers at equal compute.",
    "Momentum (AdamW: b1) and 1 - lr * weight decay are held at or above config.min_decay, "
    "the bound the reversible method sizes its bit stack for, in every contender's space.",
)
CONTENDERS = ("random_constant", "random_warmup_cosine", "tpe_constant", "tpe_warmup_cosine",
              "hypergradient_descent", "truncated", "hypergradient", "hypergradient_smooth",
              "tpe_then_hypergradient")
HYPERGRADIENT_CONTENDERS = ("hypergradient", "hypergradient_smooth", "tpe_then_hypergradient")
B2, EPS, EPS_ROOT = 0.999, 1e-8, 1e-8
MAX_MOMENTUM = 0.999
SPACE = ("log_lr", "momentum", "log_wd", "log_scale")


# ------------------------------------------------------------------------------------------------
# Tasks: a model, an optimizer, a number of steps


class Task:
  """One training problem: ``train(hp, key, method)`` and its scores, and a float step.

  ``hp`` (the full hyperparameters every contender ends up proposing) is a dict of
  ``lr``, ``mom`` (momentum or b1) and ``wd``, each a ``[T]`` schedule per weight type, and
  ``log_scale``, one init-scale offset to 1 / sqrt(fan in) per weight type.
  """

  def __init__(self, spec, data, c):
    model, self.optimizer, steps = spec.split(":")
    if model not in ("mlp", "convnet") or self.optimizer not in ("sgd", "adamw"):
      raise app.UsageError(f"a task is model:optimizer:steps with model mlp or convnet and "
                           f"optimizer sgd or adamw, got {spec!r}")
    self.model, self.num_steps = model, int(steps)
    self.name = f"{model}_{self.optimizer}_T{self.num_steps}"
    (self.x_train, self.y_train), (self.x_valid, self.y_valid), (self.x_test, self.y_test) = data
    self.batch_size = c.batch_size
    if model == "mlp":
      sizes = tuple(c.layer_sizes)
      self.noise = lambda key: revhyper.models.mlp_noise(key, sizes)
      self.apply = revhyper.models.mlp_apply
      fan_in = [(n, n) for n in sizes[:-1]]
    else:
      self.noise, self.apply, fan_in = convnet(tuple(c.conv_channels))
    self.log_fan_in = [{"W": jnp.float32(-0.5 * np.log(w)), "b": jnp.float32(-0.5 * np.log(b))}
                       for w, b in fan_in]
    self.like = self.noise(jax.random.key(0))
    self.max_lr = (c.sgd_learning_rate if self.optimizer == "sgd" else c.adamw_learning_rate)[1]
    self.max_wd = c.weight_decay[1]

  def loss(self, params, x, y):
    return revhyper.models.softmax_cross_entropy(self.apply(params, x), y)

  def init_params(self, hp, key):
    return jax.tree.map(lambda n, f, s: jnp.exp(f + s) * n, self.noise(key), self.log_fan_in,
                        hp["log_scale"])

  def batch_loss_fn(self, batch_key):
    num_train = int(self.x_train.shape[0])

    def batch_loss(params, _, t):
      idx = revhyper.datasets.batch_indices(batch_key, t, num_train, self.batch_size)
      return self.loss(params, self.x_train[idx], self.y_train[idx])
    return batch_loss

  def train(self, hp, key, method):
    """The weights after T steps of revhyper's optimizer from the key's noise and batches."""
    noise_key, batch_key = jax.random.split(key)
    params, batch_loss = self.init_params(hp, noise_key), self.batch_loss_fn(batch_key)
    common_args = dict(num_steps=self.num_steps, learning_rate=hp["lr"],
                       weight_decay=hp["wd"], method=method)
    if self.optimizer == "sgd":
      return revhyper.sgd(batch_loss, params, None, momentum=hp["mom"], **common_args).params
    return revhyper.adam(batch_loss, params, None, b1=hp["mom"], b2=B2, eps=EPS,
                         eps_root=EPS_ROOT, **common_args).params

  def scores(self, params):
    out = {}
    for name, x, y in (("valid", self.x_valid, self.y_valid), ("test", self.x_test, self.y_test)):
      logits = self.apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  # A float implementation of the same step, for the contenders that differentiate only a
  # step or a window at a time and carry the optimizer state between them.

  def opt_init(self, params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    if self.optimizer == "sgd":
      return (zeros,)
    # mu, nu, and the running product of b1 (AdamW's bias correction with a b1 schedule).
    return (zeros, zeros, jax.tree.map(lambda _: jnp.float32(1.0), params))

  def float_step(self, w, state, g, lr, mom, wd, t):
    """One step of revhyper.sgd's (or revhyper.adam's) update in floats; lr, mom, wd: one
    scalar per weight type."""
    if self.optimizer == "sgd":
      (v,) = state
      v = jax.tree.map(lambda v, g, m: m * v - (1 - m) * g, v, g, mom)
      w = jax.tree.map(lambda w, v, a, l: w - a * l * w + a * v, w, v, lr, wd)
      return w, (v,)
    mu, nu, prod = state
    mu = jax.tree.map(lambda m, g, b: b * m + (1 - b) * g, mu, g, mom)
    nu = jax.tree.map(lambda n, g: B2 * n + (1 - B2) * g * g, nu, g)
    prod = jax.tree.map(lambda p, b: p * b, prod, mom)
    c2 = 1 - B2 ** (t + 1).astype(jnp.float32)

    def new_w(w, m, n, p, a, l):
      update = (m / (1 - p)) / (jnp.sqrt(n / c2 + EPS_ROOT) + EPS)
      return w - a * (update + l * w)
    return jax.tree.map(new_w, w, mu, nu, prod, lr, wd), (mu, nu, prod)


def convnet(channels):
  """``(noise(key), apply(params, x), fan_in)`` of a tanh convnet: 3x3 stride-2 convolutions
  of ``channels``, then a linear layer to 10 classes; no BatchNorm. Parameters are a list of
  ``{"W", "b"}`` dicts, like revhyper.models' MLPs, so schedules per weight type apply."""
  side, shapes, fan_in, c_in = 28, [], [], 1
  for c_out in channels:
    shapes += [((3, 3, c_in, c_out), (c_out,))]
    fan_in.append((9 * c_in, 9 * c_in))
    side, c_in = -(-side // 2), c_out
  shapes.append(((side * side * c_in, 10), (10,)))
  fan_in.append((side * side * c_in, side * side * c_in))

  def noise(key):
    keys = jax.random.split(key, 2 * len(shapes))
    return [{"W": jax.random.normal(keys[2 * i], w, jnp.float32),
             "b": jax.random.normal(keys[2 * i + 1], b, jnp.float32)}
            for i, (w, b) in enumerate(shapes)]

  def apply(params, x):
    h = x.reshape(x.shape[:-1] + (28, 28, 1))
    for layer in params[:-1]:
      h = jnp.tanh(conv3x3_stride2(h, layer["W"]) + layer["b"])
    return h.reshape(h.shape[:-3] + (-1,)) @ params[-1]["W"] + params[-1]["b"]

  return noise, apply, fan_in


def conv3x3_stride2(h, w):
  """A 3x3 stride-2 "SAME" convolution (NHWC input, HWIO kernel) as nine strided slices and
  one matrix product: the same function as ``lax.conv_general_dilated``, whose CPU kernels and
  their gradients ran a 100-step training run of this convnet (channels 8, 16, batch 200) 7x
  slower (5.5 s against 0.8 s)."""
  side, channels = h.shape[-3], h.shape[-1]
  out = -(-side // 2)
  pad = max(2 * (out - 1) + 3 - side, 0)
  low = pad // 2
  h = jnp.pad(h, [(0, 0)] * (h.ndim - 3) + [(low, pad - low), (low, pad - low), (0, 0)])
  patches = [h[..., i:i + 2 * out - 1:2, j:j + 2 * out - 1:2, :]
             for i in range(3) for j in range(3)]
  return jnp.concatenate(patches, axis=-1) @ w.reshape(9 * channels, -1)


# ------------------------------------------------------------------------------------------------
# Hyperparameter families: what each contender searches, mapped to the full hyperparameters


def warmup_cosine_shape(num_steps, warmup_fraction):
  """The multiplier of the peak rate at each step: linear warmup, then cosine towards 0."""
  t = np.arange(num_steps, dtype=np.float64)
  warmup = max(1, int(round(warmup_fraction * num_steps)))
  ramp = np.minimum((t + 1) / warmup, 1.0)
  decay = 0.5 * (1 + np.cos(np.pi * np.maximum(t - warmup + 1, 0) / (num_steps - warmup + 1)))
  return jnp.asarray(ramp * decay, jnp.float32)


def point_hp(task, p, shape):
  """Full hyperparameters of one point of the search space: ``p`` holds log lr, momentum,
  log wd and log init scale; ``shape`` multiplies the rate per step (ones: constant)."""
  lr = jnp.minimum(jnp.exp(jnp.float32(p["log_lr"])) * shape, task.max_lr)
  per_step = lambda v: jax.tree.map(lambda _: v, task.like)
  return {"lr": per_step(lr),
          "mom": per_step(jnp.full((task.num_steps,), p["momentum"], jnp.float32)),
          "wd": per_step(jnp.full((task.num_steps,), np.exp(p["log_wd"]), jnp.float32)),
          "log_scale": jax.tree.map(lambda _: jnp.float32(p["log_scale"]), task.like)}


def bounded(task, log_lr, logit_mom, log_wd, min_decay):
  """Learning rate, momentum and weight decay from unconstrained values, within the bounds."""
  return (jnp.minimum(jnp.exp(log_lr), task.max_lr),
          jnp.clip(jax.nn.sigmoid(logit_mom), min_decay, MAX_MOMENTUM),
          jnp.minimum(jnp.exp(log_wd), task.max_wd))


def free_theta(task, p):
  """The paper's free parameterisation at a point: a value per step and weight type."""
  full = lambda v: jax.tree.map(lambda _: jnp.full((task.num_steps,), v, jnp.float32), task.like)
  return {"log_lr": full(p["log_lr"]), "logit_mom": full(np.log(p["momentum"] /
                                                               (1 - p["momentum"]))),
          "log_wd": full(p["log_wd"]),
          "log_scale": jax.tree.map(lambda _: jnp.float32(p["log_scale"]), task.like)}


def free_hp(task, theta, min_decay):
  pieces = jax.tree.map(lambda a, m, w: bounded(task, a, m, w, min_decay), theta["log_lr"],
                        theta["logit_mom"], theta["log_wd"])
  is_triple = lambda x: isinstance(x, tuple)
  lr, mom, wd = (jax.tree.map(lambda x: x[i], pieces, is_leaf=is_triple) for i in range(3))
  return {"lr": lr, "mom": mom, "wd": wd, "log_scale": theta["log_scale"]}


def smooth_basis(num_steps, num_basis):
  """[num_basis, T] cosine basis functions of the step, cos(pi k t / (T - 1)), k = 1.."""
  s = np.arange(num_steps) / max(num_steps - 1, 1)
  return jnp.asarray(np.cos(np.pi * np.arange(1, num_basis + 1)[:, None] * s), jnp.float32)


def smooth_theta(task, p, num_basis):
  return {"log_lr": jnp.float32(p["log_lr"]),
          "logit_mom": jnp.float32(np.log(p["momentum"] / (1 - p["momentum"]))),
          "log_wd": jnp.float32(p["log_wd"]), "log_scale": jnp.float32(p["log_scale"]),
          # One offset of the log rate per weight type, then the basis coefficients.
          "per_type": jax.tree.map(lambda _: jnp.zeros((num_basis + 1,), jnp.float32),
                                   task.like)}


def smooth_hp(task, theta, shape, basis, min_decay):
  """The smooth family: peak * warmup-cosine(t) * exp(offset + coefficients . basis(t)) per
  weight type; one momentum, weight decay and init scale for all."""
  _, mom, wd = bounded(task, theta["log_lr"], theta["logit_mom"], theta["log_wd"], min_decay)
  lr = jax.tree.map(lambda a: jnp.minimum(
      jnp.exp(theta["log_lr"] + a[0] + a[1:] @ basis) * shape, task.max_lr), theta["per_type"])
  per_step = lambda v: jax.tree.map(lambda _: jnp.full((task.num_steps,), v), task.like)
  return {"lr": lr, "mom": per_step(mom), "wd": per_step(wd),
          "log_scale": jax.tree.map(lambda _: theta["log_scale"], task.like)}


# ------------------------------------------------------------------------------------------------
# The contenders' units of work, compiled once per task


def make_programs(task, c):
  """The jit-compiled functions the contenders call on one task."""
  method = revhyper.Reversible(min_momentum=c.min_decay)

  @jax.jit
  def evaluate_one(hp, key):
    # Forward only, in floats: the reversible method would give the same training run.
    return task.scores(task.train(hp, key, "unroll"))

  def evaluate(hp, keys):
    # One seed at a time: one compiled program for the search and the scoring alike (on a
    # CPU, a vmap over seeds is barely faster than a loop).
    return stack([evaluate_one(hp, k) for k in keys])

  def meta_loss(hp, key):
    return task.scores(task.train(hp, key, method))["valid_loss"]

  @jax.jit
  def hypergradients(hp, keys):
    return revhyper.meta.per_seed_hypergradients(meta_loss, hp, keys)

  def hd_pass(beta, key, base_hp):
    """One training run with hypergradient descent on one global log learning rate."""
    noise_key, batch_key = jax.random.split(key)
    params = task.init_params(base_hp, noise_key)
    at = lambda tree, t: jax.tree.map(lambda s: s[t], tree)

    def step(w, state, g, lr, t):
      return task.float_step(w, state, g, jax.tree.map(lambda _: lr, w), at(base_hp["mom"], t),
                             at(base_hp["wd"], t), t)

    log_lr = jnp.log(jax.tree.leaves(base_hp["lr"])[0][0])
    w, rates = hypergradient_descent_run(
        jax.grad(task.batch_loss_fn(batch_key)), step, params, task.opt_init(params), log_lr,
        beta, task.num_steps, task.max_lr)
    return dict(task.scores(w), learning_rate=rates)

  hd_search = jax.jit(hd_pass)

  def hd_evaluate(beta, keys, base_hp):
    return stack([hd_search(beta, k, base_hp) for k in keys])

  def truncated_hypergradient(theta, key):
    """Every window's hypergradient of the validation minibatch loss at its end, in one pass
    of training with the current schedules (the state entering a window is held fixed)."""
    window, num_windows = c.window, task.num_steps // c.window
    # The same noise and batches as train(hp, key): the valid batches from a key of their own.
    noise_key, batch_key = jax.random.split(key)
    valid_key = jax.random.fold_in(key, 1)
    hp = free_hp(task, theta, c.min_decay)
    params = task.init_params(hp, noise_key)
    grad = jax.grad(task.batch_loss_fn(batch_key))
    schedules = {k: jax.tree.map(lambda s: s.reshape(num_windows, window), theta[k])
                 for k in ("log_lr", "logit_mom", "log_wd")}
    num_valid = int(task.x_valid.shape[0])

    def window_loss(sched, w, state, i):
      def step(carry, k):
        w, state = carry
        t = i * window + k
        lr, mom, wd = _window_coefs(task, sched, k, c.min_decay)
        return task.float_step(w, state, grad(w, None, t), lr, mom, wd, t), None
      (w, state), _ = jax.lax.scan(step, (w, state), jnp.arange(window))
      idx = revhyper.datasets.batch_indices(valid_key, i, num_valid, task.batch_size)
      return task.loss(w, task.x_valid[idx], task.y_valid[idx]), (w, state)

    def body(carry, xs):
      w, state = carry
      sched, i = xs
      (value, (w, state)), g = jax.value_and_grad(window_loss, has_aux=True)(sched, w, state, i)
      return jax.lax.stop_gradient((w, state)), (value, g)

    _, (values, grads) = jax.lax.scan(body, (params, task.opt_init(params)),
                                      (schedules, jnp.arange(num_windows)))
    grads = {k: jax.tree.map(lambda g: g.reshape(task.num_steps), v) for k, v in grads.items()}
    grads["log_scale"] = jax.tree.map(jnp.zeros_like, theta["log_scale"])
    return jnp.mean(values), grads

  return {"evaluate": evaluate, "hypergradients": hypergradients,
          "hd_search": hd_search, "hd_evaluate": hd_evaluate,
          "truncated": jax.jit(truncated_hypergradient)}


def hypergradient_descent_run(grad, step, params, state, log_lr, beta, num_steps, max_lr):
  """Training with hypergradient descent (Baydin et al. 2018) on one global learning rate.

  At step t the gradient g_t of this step's loss also gives the hypergradient of that loss in
  the previous step's rate, g_t . d w_t / d lr_{t-1}; the multiplicative form moves log lr by
  -beta times its cosine (the hypergradient over the norms), so that beta is a fraction of e
  per step whatever the gradients' scale. d w_{t+1} / d lr_t comes from a forward-mode
  derivative of the step.

  Args:
    grad: ``grad(w, None, t)``, the training gradient at step t.
    step: ``step(w, state, g, lr, t) -> (w, state)``, one optimizer step at the scalar rate lr.
    params, state: the initial weights and optimizer state.
    log_lr: the initial log learning rate.
    beta: the hypergradient step.
    num_steps: T.
    max_lr: the rate is held at or below it.

  Returns:
    ``(final weights, [T] learning rates used)``.
  """
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def body(carry, t):
    w, state, log_lr, direction = carry
    g = grad(w, None, t)
    norms = jnp.sqrt(dot(g, g)) * jnp.sqrt(dot(direction, direction))
    # Clipped and zero without a direction: norms that underflow must not blow the ratio up.
    cosine = jnp.clip(jnp.where(norms > 0, dot(g, direction) / jnp.where(norms > 0, norms, 1.0),
                                0.0), -1.0, 1.0)
    log_lr = jnp.minimum(log_lr - beta * cosine, jnp.log(max_lr))
    (w, state), (direction, _) = jax.jvp(lambda lr: step(w, state, g, lr, t),
                                         (jnp.exp(log_lr),), (jnp.ones_like(log_lr),))
    return (w, state, log_lr, direction), jnp.exp(log_lr)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (w, _, _, _), rates = jax.lax.scan(body, (params, state, log_lr, zeros), jnp.arange(num_steps))
  return w, rates


def concatenate(results):
  """One pytree of [n] rows from n pytrees of [1] rows."""
  return jax.tree.map(lambda *x: jnp.concatenate(x), *results)


def stack(results):
  """One dict of [n] arrays from n dicts of scalars (or arrays)."""
  return jax.tree.map(lambda *x: jnp.stack(x), *results)


def _window_coefs(task, sched, k, min_decay):
  """The learning rate, momentum and weight decay of step k of a window, per weight type."""
  pieces = jax.tree.map(lambda a, m, w: bounded(task, a[k], m[k], w[k], min_decay),
                        sched["log_lr"], sched["logit_mom"], sched["log_wd"])
  is_triple = lambda x: isinstance(x, tuple)
  return tuple(jax.tree.map(lambda x: x[i], pieces, is_leaf=is_triple) for i in range(3))


# ------------------------------------------------------------------------------------------------
# The contenders: each a generator that does one unit of work per step and yields its current
# best candidate, {"id", "kind": "schedule" (with "hp") or "hd" (with "beta"), "found"}


def search_space(task, c):
  lr = c.sgd_learning_rate if task.optimizer == "sgd" else c.adamw_learning_rate
  return {"log_lr": tuple(np.log(lr)), "momentum": tuple(c.momentum),
          "log_wd": tuple(np.log(c.weight_decay)), "log_scale": tuple(np.log(c.init_scale))}


def default_point(task, c):
  lr = c.default_sgd_learning_rate if task.optimizer == "sgd" else c.default_adamw_learning_rate
  return {"log_lr": float(np.log(lr)), "momentum": c.default_momentum,
          "log_wd": float(np.log(c.default_weight_decay)),
          "log_scale": float(np.log(c.default_init_scale))}


def mean_valid_error(scores):
  """The mean validation error over seeds; a diverged run (non-finite loss) counts as 1."""
  errors = np.where(np.isfinite(np.asarray(scores["valid_loss"])),
                    np.asarray(scores["valid_error"]), 1.0)
  return float(errors.mean())


def search(objective, sampler):
  """Random search or TPE: yields ``(best error, its trial, its point)`` after every trial of
  ``objective(point) -> error``; ``sampler(i) -> (point, tell(error))``."""
  best = None
  for i in range(10 ** 9):
    p, tell = sampler(i)
    error = objective(p, i)
    tell(error)
    if best is None or error < best[0]:
      best = (error, i, p)
    yield best


def search_candidates(task, programs, shape, sampler, search_keys):
  """``search`` over points of a family, one training run per trial, as candidates."""
  def objective(p, i):
    return mean_valid_error(programs["evaluate"](point_hp(task, p, shape), search_keys(i)))

  for error, i, p in search(objective, sampler):
    yield {"id": f"trial{i}", "kind": "schedule", "hp": point_hp(task, p, shape),
           "found": {"trial": i, "valid_error_in_search": error,
                     **{k: float(v) for k, v in p.items()}}}


def random_sampler(space, seed):
  rng = np.random.default_rng(seed)

  def sample(_):
    return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in space.items()}, lambda error: None
  return sample


def tpe_sampler(space, seed, startup_trials):
  import optuna  # an optional dependency (the "hpo" extra): only this contender needs it
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(
      seed=seed, n_startup_trials=startup_trials))

  def sample(_):
    trial = study.ask()
    p = {k: trial.suggest_float(k, lo, hi) for k, (lo, hi) in space.items()}
    return p, lambda error: study.tell(trial, error)
  return sample


def hypergradient_descent(programs, base_hp, betas, search_keys):
  """One hypergradient-descent pass per unit, cycling through the betas; the best beta by its
  mean validation error over its passes so far."""
  errors = {float(b): [] for b in betas}
  for i in range(10 ** 9):
    beta = float(betas[i % len(betas)])
    out = programs["hd_search"](jnp.float32(beta), search_keys(i)[0], base_hp)
    errors[beta].append(mean_valid_error(jax.tree.map(lambda x: x[None], out)))
    best = min((b for b in errors if errors[b]), key=lambda b: np.mean(errors[b]))
    yield {"id": f"beta{best}", "kind": "hd", "beta": best,
           "found": {"beta": best, "passes": len(errors[best]),
                     "valid_error_in_search": float(np.mean(errors[best])),
                     "learning_rate_last_pass": np.asarray(out["learning_rate"]).tolist()}}


def meta_optimizer(c, meta_step, num_steps):
  """optax.adam after clip_hypergradient; with ``config.meta_step_decay``, its step decays
  along a cosine from ``meta_step`` to 0 over the ``num_steps`` meta-steps the budget affords:
  near an optimum the hypergradient is mostly noise across seeds, which steps of a fixed size
  follow (docs/hpo.rst)."""
  if c.meta_step_decay and num_steps is not None:
    meta_step = optax.cosine_decay_schedule(meta_step, max(int(num_steps), 1))
  return optax.chain(revhyper.meta.clip_hypergradient(c.max_hypergrad_norm),
                     optax.adam(meta_step))


def affordable(budget_runs, cost_runs):
  """How many units of ``cost_runs`` a budget pays for (at least one: the first always runs)."""
  return max(1, int(budget_runs // cost_runs))


def gradient_learner(to_hp, theta, programs, keys_for, c, spread_history=None, meta_step=None,
                     num_steps=None):
  """Meta-steps of ``meta_optimizer`` on the full-horizon exact hypergradient
  (``programs["hypergradients"]`` over ``keys_for(i)``, averaged) of the parameterisation
  ``to_hp(theta)``, expected to run ``num_steps`` times; with ``spread_history``, each step's
  spread across seeds is appended.

  Each hypergradient comes with the validation loss of the point it was taken at. With
  ``config.keep_best``, every candidate is the point with the lowest such loss so far (as the
  searches keep their best trial): a meta-step that overshoots, or a schedule that diverges on
  one seed, is not what is scored. Without it, every candidate is the point just stepped to.
  """
  optimizer = meta_optimizer(c, c.meta_step if meta_step is None else meta_step, num_steps)
  state = optimizer.init(theta)
  best = None  # (mean validation loss, meta-steps taken, hp) of the best point evaluated
  for i in range(10 ** 9):
    hp, pullback = jax.vjp(to_hp, theta)
    # One seed at a time through one compiled program: on a CPU, a vmap of reversible runs
    # is slower than running them one after the other.
    losses, per_seed = concatenate([programs["hypergradients"](hp, k[None]) for k in keys_for(i)])
    loss = float(jnp.mean(losses))
    # A diverged point (a loss not finite) is never kept, nor does it block later ones.
    if math.isfinite(loss) and (best is None or loss < best[0]):
      best = (loss, i, hp)
    (grad,) = pullback(jax.tree.map(lambda g: jnp.mean(g, axis=0), per_seed))
    if spread_history is not None and losses.shape[0] > 1:
      per_step = revhyper.meta.hypergradient_variance(per_seed)
      family = revhyper.meta.hypergradient_variance(jax.vmap(lambda g: pullback(g)[0])(per_seed))
      spread_history.append({
          "iteration": i, "meta_loss": loss,
          "signal_to_noise_per_step": float(per_step.signal_to_noise),
          "mean_cosine_per_step": float(per_step.mean_cosine),
          "signal_to_noise_family": float(family.signal_to_noise),
          "mean_cosine_family": float(family.mean_cosine)})
    updates, state = optimizer.update(grad, state, theta)
    theta = optax.apply_updates(theta, updates)
    logging.info("meta-iteration %d: validation loss %.4f", i, loss)
    found = {"meta_iterations": i + 1, "last_meta_loss": loss}
    if c.keep_best and best is not None:
      found.update(kept_point_meta_steps=best[1], kept_point_meta_loss=best[0])
      # The id names the point, so that a point kept over several steps is scored once.
      yield {"id": f"point{best[1]}", "kind": "schedule", "hp": best[2], "found": found}
    else:
      yield {"id": f"point{i + 1}", "kind": "schedule", "hp": to_hp(theta), "found": found}


def truncated_learner(task, theta, programs, search_keys, c, num_steps=None):
  """Meta-steps on the truncated hypergradients of the free per-step schedules."""
  optimizer = meta_optimizer(c, c.meta_step, num_steps)
  state = optimizer.init(theta)
  for i in range(10 ** 9):
    value, grad = programs["truncated"](theta, search_keys(i)[0])
    updates, state = optimizer.update(grad, state, theta)
    theta = optax.apply_updates(theta, updates)
    yield {"id": f"pass{i + 1}", "kind": "schedule", "hp": free_hp(task, theta, c.min_decay),
           "found": {"passes": i + 1, "last_window_loss": float(value)}}


# ------------------------------------------------------------------------------------------------
# Compute accounting and scoring


def measured_seconds(calls, repeats):
  """Per name, the fastest of ``repeats`` timed calls of ``fn(*args)`` (``calls[name] = (fn,
  args)``), after one that compiles each; the calls alternate between the names, so that a
  change in the machine's load falls on every unit of work alike, not on one of the ratios."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      times[name].append(common.timed_call(fn, *args)[0])
  return {name: min(t) for name, t in times.items()}


def with_cost(steps, cost):
  """The candidates of ``steps``, each marked with the compute its unit of work cost."""
  for candidate in steps:
    yield dict(candidate, cost=cost)


def run_contender(steps, budget, fractions, score):
  """Runs ``steps`` (candidates marked ``with_cost``) while the budget affords the next unit
  (at least one), scoring the candidate on held-out seeds at the last unit before each
  fraction of the budget would be passed. Returns the curve: ``[{"compute_runs", "units",
  "candidate", "scores"}]``."""
  marks = sorted(set(fractions) | {1.0})
  curve, cache, spent = [], {}, 0.0
  for unit, candidate in enumerate(steps, start=1):
    spent += candidate["cost"]
    # The next unit is assumed to cost what this one did.
    while marks and spent + candidate["cost"] > marks[0] * budget + 1e-9:
      if candidate["id"] not in cache:
        cache[candidate["id"]] = score(candidate)
      if not curve or curve[-1]["units"] != unit:
        curve.append({"compute_runs": spent, "units": unit, "candidate": candidate,
                      "scores": cache[candidate["id"]]})
      marks.pop(0)
    if not marks:
      break
  return curve


def warm_started(first, trials, then):
  """``trials`` candidates of ``first`` (a search), then those of ``then(best point)``."""
  candidate = None
  for _, candidate in zip(range(trials), first):
    yield candidate
  point = {k: candidate["found"][k] for k in SPACE}
  yield from then(point)


def summary_of(task, candidate):
  """What a candidate found, for results.json: its own record, plus the mean learning rate
  over weight types at each step for a schedule."""
  found = dict(candidate["found"])
  if candidate["kind"] == "schedule":
    hp = candidate["hp"]
    found["learning_rate_mean_over_types"] = np.mean(
        [np.asarray(x) for x in jax.tree.leaves(hp["lr"])], axis=0).tolist()
    found["momentum_mean"] = float(np.mean([np.asarray(x) for x in jax.tree.leaves(hp["mom"])]))
    found["weight_decay_mean"] = float(np.mean([np.asarray(x)
                                                for x in jax.tree.leaves(hp["wd"])]))
    found["init_scale"] = [float(np.exp(x)) for x in jax.tree.leaves(hp["log_scale"])]
  return found


def selected_contenders(c):
  """``config.contenders`` in the benchmark's order (all of them when empty), checked."""
  unknown = sorted(set(c.contenders) - set(CONTENDERS))
  if unknown:
    raise ValueError(f"config.contenders: unknown {unknown}; choose from {CONTENDERS}")
  return [n for n in CONTENDERS if not c.contenders or n in c.contenders]


def verdict(task_name, contenders):
  """One sentence: the better full-horizon hypergradient contender (by held-out validation
  error) against the best other one (likewise), on test error, at two standard errors."""
  pick = lambda names: min(names, key=lambda n: contenders[n]["valid_error"]["mean"])
  hypers = [n for n in HYPERGRADIENT_CONTENDERS if n in contenders]
  others = [n for n in contenders if n not in HYPERGRADIENT_CONTENDERS]
  if not hypers or not others:  # config.contenders left one side out
    return {"outcome": None, "sentence": f"{task_name}: no verdict (config.contenders holds "
                                         f"{'no hypergradient' if not hypers else 'no other'} "
                                         f"contender)"}
  hyper, other = pick(hypers), pick(others)
  a, b = contenders[hyper]["test_error"], contenders[other]["test_error"]
  diff = a["mean"] - b["mean"]
  se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
  outcome = "wins" if diff < -2 * se else "loses" if diff > 2 * se else "ties"
  return {"outcome": outcome, "hypergradient": hyper, "best_other": other,
          "difference": diff, "standard_error": se,
          "sentence": (f"{task_name}: the exact hypergradient {outcome} ({hyper} "
                       f"{100 * a['mean']:.2f} ± {100 * a['sd']:.2f}% test error against "
                       f"{other} {100 * b['mean']:.2f} ± {100 * b['sd']:.2f}%, "
                       f"{a['n']} fresh seeds, equal compute)")}


def run_task(task, c):
  """Every contender on one task; the task's entry of results.json."""
  tick = time.time()
  programs = make_programs(task, c)
  train_key = common.meta_training_key(c.seed)
  search_keys = lambda i, n=c.search_seeds: jax.random.split(jax.random.fold_in(train_key, i), n)
  eval_keys = common.held_out_keys(c.seed, c.eval_seeds)
  space, start = search_space(task, c), default_point(task, c)
  constant = jnp.ones((task.num_steps,), jnp.float32)
  cosine = warmup_cosine_shape(task.num_steps, c.warmup_fraction)
  basis = smooth_basis(task.num_steps, c.num_basis)
  base_hp = point_hp(task, start, constant)
  to_free = lambda theta: free_hp(task, theta, c.min_decay)
  to_smooth = lambda theta: smooth_hp(task, theta, cosine, basis, c.min_decay)
  avg_keys = lambda i: search_keys(i, c.avg_seeds)

  # Costs, measured here: one training run, then each other unit of work over it.
  seconds = measured_seconds({
      "run": (programs["evaluate"], (base_hp, search_keys(0, 1))),
      "hypergradient": (programs["hypergradients"], (base_hp, search_keys(0, 1))),
      "hypergradient_descent": (programs["hd_search"],
                                (jnp.float32(0.01), search_keys(0)[0], base_hp)),
      "truncated": (programs["truncated"], (free_theta(task, start), search_keys(0)[0])),
  }, c.timing_repeats)
  run_seconds = seconds.pop("run")
  # The smooth family's unit runs the same program once per seed (its own mapping to the
  # schedules costs microseconds): avg_seeds times one measured hypergradient, so that the two
  # full-horizon contenders are charged consistently on a busy machine.
  seconds["hypergradient_smooth"] = c.avg_seeds * seconds["hypergradient"]
  costs = {name: s / run_seconds for name, s in seconds.items()}
  costs.update({name: float(c.search_seeds) for name in CONTENDERS[:4]})
  warm_trials = max(1, int(c.warm_start_fraction * c.budget_runs / c.search_seeds))
  print(f"{task.name}: one training run {run_seconds * 1e3:.1f} ms; costs in runs: "
        + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()), flush=True)

  spread = []
  steps = {
      "random_constant": search_candidates(task, programs, constant, random_sampler(space, c.seed),
                                search_keys),
      "random_warmup_cosine": search_candidates(task, programs, cosine, random_sampler(space, c.seed),
                                     search_keys),
      "tpe_constant": search_candidates(task, programs, constant,
                             tpe_sampler(space, c.seed, c.tpe_startup_trials), search_keys),
      "tpe_warmup_cosine": search_candidates(task, programs, cosine,
                                  tpe_sampler(space, c.seed, c.tpe_startup_trials), search_keys),
      "hypergradient_descent": hypergradient_descent(programs, base_hp, c.hd_betas, search_keys),
      "truncated": truncated_learner(task, free_theta(task, start), programs, search_keys, c,
                                     affordable(c.budget_runs, costs["truncated"])),
      "hypergradient": gradient_learner(to_free, free_theta(task, start), programs,
                                        lambda i: search_keys(i, 1), c,
                                        num_steps=affordable(c.budget_runs,
                                                             costs["hypergradient"])),
      "hypergradient_smooth": gradient_learner(
          to_smooth, smooth_theta(task, start, c.num_basis), programs, avg_keys, c, spread,
          c.smooth_meta_step, affordable(c.budget_runs, costs["hypergradient_smooth"])),
  }
  steps = {name: with_cost(s, costs[name]) for name, s in steps.items()}
  # TPE over the warmup-cosine family for part of the budget, then the smooth family's
  # hypergradients from the best point it found.
  steps["tpe_then_hypergradient"] = warm_started(
      with_cost(search_candidates(task, programs, cosine,
                                  tpe_sampler(space, c.seed, c.tpe_startup_trials), search_keys),
                c.search_seeds),
      warm_trials,
      lambda point: with_cost(gradient_learner(
          to_smooth, smooth_theta(task, point, c.num_basis), programs,
          lambda i: avg_keys(10 ** 6 + i), c, meta_step=c.smooth_meta_step,
          num_steps=affordable(c.budget_runs - warm_trials * c.search_seeds,
                               costs["hypergradient_smooth"])),
          costs["hypergradient_smooth"]))
  costs["tpe_then_hypergradient"] = costs["hypergradient_smooth"]

  def score(candidate):
    if candidate["kind"] == "hd":
      out = programs["hd_evaluate"](jnp.float32(candidate["beta"]), eval_keys, base_hp)
    else:
      out = programs["evaluate"](candidate["hp"], eval_keys)
    return {k: common.mean_sd(out[k]) for k in ("test_error", "valid_error", "test_loss")}

  contenders = {}
  for name in selected_contenders(c):
    began = time.time()
    curve = run_contender(steps[name], c.budget_runs, c.checkpoints, score)
    last = curve[-1]
    contenders[name] = {
        "compute_runs": last["compute_runs"], "units": last["units"],
        "unit_cost_runs": costs[name],
        "test_error": last["scores"]["test_error"], "valid_error": last["scores"]["valid_error"],
        "test_loss": last["scores"]["test_loss"],
        "curve": [{"compute_runs": p["compute_runs"], "test_error": p["scores"]["test_error"]}
                  for p in curve],
        "found": summary_of(task, last["candidate"]), "seconds": time.time() - began}
    print(f"  {name}: test error {common.format_mean_sd(last['scores']['test_error'], 100, 2, '%')}"
          f" after {last['compute_runs']:.1f} runs ({time.time() - began:.0f} s)", flush=True)
  result = {"model": task.model, "optimizer": task.optimizer, "num_steps": task.num_steps,
            "seconds_per_run": run_seconds, "measured_seconds": seconds, "cost_runs": costs,
            "budget_runs": c.budget_runs, "hypergradient_spread": spread,
            "contenders": contenders, "seconds": time.time() - tick}
  result["verdict"] = verdict(task.name, contenders)
  print("  " + result["verdict"]["sentence"], flush=True)
  return result


def plot(tasks):
  """Best-found held-out test error against compute, one panel per task, bands of one sd."""
  names = list(tasks)
  cols = min(2, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    for i, (contender, record) in enumerate(tasks[name]["contenders"].items()):
      x = [p["compute_runs"] for p in record["curve"]]
      mean = np.array([100 * p["test_error"]["mean"] for p in record["curve"]])
      sd = np.array([100 * p["test_error"]["sd"] for p in record["curve"]])
      style = "-" if contender in HYPERGRADIENT_CONTENDERS else "--"
      ax.plot(x, mean, style, marker="o", ms=3, color=f"C{i}", label=contender)
      ax.fill_between(x, mean - sd, mean + sd, color=f"C{i}", alpha=0.12, lw=0)
    ax.set(xlabel="compute (training-run equivalents)", ylabel="held-out test error (%)",
           title=name)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("Best found so far, scored on fresh seeds and the test split (mean ± sd)")
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value  # noqa: F821  (defined before app.run, below)
  for spec in c.tasks:
    if int(spec.split(":")[-1]) % c.window:
      raise app.UsageError(f"config.window={c.window} must divide every task's steps: {spec}")
  selected_contenders(c)  # an unknown name fails here, not after the first task's searches
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, note = common.load_mnist_splits(c.mnist_dir, tuple(c.split), c.seed,
                                        ("train", "valid", "test"))
  tasks = {}
  for spec in c.tasks:
    task = Task(spec, data, c)
    tasks[task.name] = run_task(task, c)
    # After every task, so that a partial run leaves its results.
    common.write_results(out_dir, EXPERIMENT, c,
                         {"data": note, "tasks": tasks, "wall_time_s": time.time() - start,
                          "complete": len(tasks) == len(c.tasks)}, DEPARTURES)
    common.save_figure(plot(tasks), out_dir, "hpo_benchmark.png")
  print(f"wrote {out_dir}/results.json and hpo_benchmark.png in {time.time() - start:.0f} s")


if __name__ == "__main__":
  # Defined here, not on import, so that the tests can import this module's functions.
  CONFIG = common.define_config("hpo_benchmark")
  common.define_out_dir("results/hpo")
  app.run(main)
