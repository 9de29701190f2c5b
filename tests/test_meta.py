"""Tests of the hyperparameter parameterisations and of the meta-optimisation loop."""

import json
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revhyper
from revhyper import _hyper
from revhyper import _meta
from revhyper import _models

# ------------------------------------------------------------------------------------------------
# Parameterisations and schedules


def test_parameterisations_round_trip():
  gammas = {"a": jnp.array([0.1, 0.5, 0.9, 0.99], jnp.float32)}
  chex.assert_trees_all_close(_hyper.momentum_from_logit(_hyper.logit(gammas)), gammas, rtol=1e-5)
  np.testing.assert_allclose(_hyper.learning_rate_from_log(jnp.float32(-1.0)), np.exp(-1.0), rtol=1e-6)
  np.testing.assert_allclose(_hyper.init_scale_from_log([jnp.float32(-3.0)])[0], np.exp(-3.0), rtol=1e-6)
  assert float(_hyper.logit(0.5)) == 0.0
  with pytest.raises(ValueError, match="p must lie"):
    _hyper.logit(jnp.array([0.5, 1.0]))
  # Traced values are not checked (no Python branch on them) and stay differentiable.
  np.testing.assert_allclose(jax.grad(_hyper.logit)(0.5), 4.0)


def test_schedules_follow_the_parameters():
  params = _models.mlp_init(jax.random.key(0), (6, 4, 3), scale=0.1)
  schedule = _hyper.constant_schedule(params, 100, -1.0)
  assert jax.tree.structure(schedule) == jax.tree.structure(params)
  assert all(x.shape == (100,) and x.dtype == jnp.float32 for x in jax.tree.leaves(schedule))
  assert len(jax.tree.leaves(schedule)) == 4  # one per weight type
  scalars = _hyper.constant_like(params, 0.5, dtype=jnp.bfloat16)
  assert all(x.shape == () and x.dtype == jnp.bfloat16 for x in jax.tree.leaves(scalars))
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    wide = _hyper.constant_schedule(params64, 3, 2.0)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(wide))
    narrow = _hyper.constant_schedule(params, 3, 2.0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(narrow))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  chex.assert_trees_all_equal(
      _hyper.constant_like(shapes, 1.0), _hyper.constant_like(params, 1.0))
  with pytest.raises(ValueError, match="num_steps"):
    _hyper.constant_schedule(params, 0, 1.0)
  with pytest.raises(TypeError, match="num_steps"):
    _hyper.constant_schedule(params, 2.0, 1.0)
  with pytest.raises(TypeError, match="dtype"):
    _hyper.constant_like({"a": 1.0}, 1.0)


# ------------------------------------------------------------------------------------------------
# Meta-optimisation

TARGET = {"w": np.array([1.0, -2.0, 0.5], np.float32), "s": np.float32(3.0)}


def quadratic(h):
  return jnp.sum((h["w"] - TARGET["w"]) ** 2) + (h["s"] - TARGET["s"]) ** 2


def start():
  return {"w": jnp.zeros(3, jnp.float32), "s": jnp.float32(0.0)}


def test_meta_optimize_decreases_a_quadratic_and_writes_history(tmp_path):
  result = _meta.meta_optimize(
      quadratic, start(), num_iterations=60, optimizer=optax.adam(0.1),
      checkpoint_dir=tmp_path, progress=False)
  losses = [r["meta_loss"] for r in result.history]
  assert len(losses) == 60 and losses[-1] < 0.05 * losses[0]
  assert [r["iteration"] for r in result.history] == list(range(60))
  on_disk = json.loads((tmp_path / _meta.HISTORY_FILE).read_text())
  assert on_disk == result.history
  assert set(on_disk[0]) == {"iteration", "meta_loss", "hypergrad_norm", "seconds", "aux"}
  first_norm = 2 * np.sqrt(1 + 4 + 0.25 + 9)  # |grad| of the quadratic at zero
  np.testing.assert_allclose(on_disk[0]["hypergrad_norm"], first_norm, rtol=1e-6)
  # One checkpoint every 5 iterations, and no temporary files left behind.
  expected = [f"ckpt_{i:08d}.npz" for i in range(5, 61, 5)] + ["history.json"]
  assert sorted(os.listdir(tmp_path)) == expected


def test_default_optimizer_is_optax_adam_and_step_is_traced_once(capsys):
  traces = []

  def meta_loss(h):
    traces.append(1)
    return quadratic(h)

  result = _meta.meta_optimize(meta_loss, start(), num_iterations=3, log_every=2, progress=True)
  assert len(traces) == 1  # compiled once, no retracing across iterations
  opt = optax.adam(0.04)
  h = start()
  state = opt.init(h)
  for _ in range(3):
    updates, state = opt.update(jax.grad(quadratic)(h), state, h)
    h = optax.apply_updates(h, updates)
  chex.assert_trees_all_close(result.hparams, h, rtol=1e-6)
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 2  # iterations 2 and 3 (the last is always logged)
  assert printed[0].startswith("meta-iteration 2/3: meta-loss")


def test_aux_and_callback():
  seen = []

  def meta_loss(h):
    return quadratic(h), {"train": {"loss": h["s"] * 2}, "vector": h["w"]}

  result = _meta.meta_optimize(
      meta_loss, start(), num_iterations=2, has_aux=True, progress=False, callback=seen.append)
  assert result.history[0]["aux"] == {"train/loss": 0.0}  # only scalar leaves are recorded
  assert [step.iteration for step in seen] == [0, 1]
  chex.assert_trees_all_close(seen[1].hypergrad, jax.grad(quadratic)(seen[1].hparams))
  chex.assert_trees_all_equal(seen[1].hparams["s"] * 2, seen[1].aux["train"]["loss"])
  assert seen[1].record is result.history[1]


def tiny_training_meta_loss(h):
  """Validation loss of a logistic regression after 6 steps of momentum SGD."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 32, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(2, 32)), jnp.int32)
  noise = _models.mlp_noise(jax.random.key(0), (8, 3))
  params = _models.mlp_init_from_noise(noise, h["log_scale"])
  velocity = jax.tree.map(jnp.zeros_like, params)

  def loss(p):
    return _models.softmax_cross_entropy(_models.mlp_apply(p, x[0]), y[0])

  def step(carry, t):
    p, v = carry
    alpha = _hyper.learning_rate_from_log(h["log_alpha"][t])
    gamma = _hyper.momentum_from_logit(h["logit_gamma"][t])
    g = jax.grad(loss)(p)
    v = jax.tree.map(lambda v_, g_: gamma * v_ - (1 - gamma) * g_, v, g)
    p = jax.tree.map(lambda p_, v_: p_ + alpha * v_, p, v)
    return (p, v), None

  (params, _), _ = jax.lax.scan(step, (params, velocity), jnp.arange(6))
  return _models.softmax_cross_entropy(_models.mlp_apply(params, x[1]), y[1])


def tiny_hparams():
  noise_like = _models.mlp_noise(jax.random.key(0), (8, 3))
  return {
      "log_alpha": jnp.full((6,), -1.0, jnp.float32),
      "logit_gamma": jnp.zeros((6,), jnp.float32),
      "log_scale": _hyper.constant_like(noise_like, -3.0),
  }


def run(folder, num_iterations, meta_loss=tiny_training_meta_loss, hparams=tiny_hparams,
        **kwargs):
  return _meta.meta_optimize(
      meta_loss, hparams(), num_iterations=num_iterations, checkpoint_dir=folder,
      checkpoint_every=2, progress=False, **kwargs)


def assert_same_run(a, b):
  chex.assert_trees_all_equal(a.hparams, b.hparams)  # bit for bit
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)

  def strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

  assert strip(a.history) == strip(b.history)


@pytest.mark.slow
def test_resume_after_interruption_is_bit_identical(tmp_path):
  full = run(tmp_path / "full", 8)
  assert full.history[-1]["meta_loss"] < full.history[0]["meta_loss"]
  # Stopped after 4 iterations (checkpoints at 2 and 4), then resumed to 8.
  run(tmp_path / "stopped", 4)
  assert_same_run(full, run(tmp_path / "stopped", 8, resume=True))
  # Resuming a finished run returns its state without running anything.
  assert_same_run(full, run(tmp_path / "full", 8, resume=True))


def test_crash_loses_nothing_checkpointed(tmp_path):
  def crash(step):
    if step.iteration == 5:  # during the sixth iteration, after the checkpoint at 4
      raise KeyboardInterrupt

  quadratic_run = dict(meta_loss=quadratic, hparams=start)
  full = run(tmp_path / "full", 8, **quadratic_run)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "crashed", 8, callback=crash, **quadratic_run)
  assert _meta.latest_checkpoint(tmp_path / "crashed").endswith("ckpt_00000004.npz")
  # history.json holds the five finished iterations (0-4), the checkpoint four of them.
  assert len(json.loads((tmp_path / "crashed" / _meta.HISTORY_FILE).read_text())) == 5
  assert_same_run(full, run(tmp_path / "crashed", 8, resume=True, **quadratic_run))


def test_checkpoint_guards(tmp_path):
  def run_quadratic(num_iterations, hparams=None, folder=tmp_path, **kwargs):
    return _meta.meta_optimize(
        quadratic, start() if hparams is None else hparams, num_iterations=num_iterations,
        checkpoint_dir=folder, checkpoint_every=2, progress=False, **kwargs)

  run_quadratic(2)
  with pytest.raises(FileExistsError, match="resume=True"):
    run_quadratic(4)
  with pytest.raises(ValueError, match="past num_iterations=1"):
    run_quadratic(1, resume=True)
  with pytest.raises(ValueError, match="tree structure"):
    run_quadratic(4, {"w": jnp.zeros(3, jnp.float32)}, resume=True)
  with pytest.raises(ValueError, match=r"hparams leaf 1 is float32 \[3\] in the checkpoint"):
    run_quadratic(4, {"w": jnp.zeros(4, jnp.float32), "s": jnp.float32(0)}, resume=True)
  with pytest.raises(ValueError, match="hparams leaf 0 is float32"):
    with jax.enable_x64(True):
      run_quadratic(4, {"w": jnp.zeros(3, jnp.float32), "s": jnp.float64(0)}, resume=True)
  # A different optimizer has a different state tree.
  with pytest.raises(ValueError, match="opt_state"):
    run_quadratic(4, resume=True, optimizer=optax.sgd(0.1))
  # resume=True on an empty folder starts afresh.
  assert len(run_quadratic(2, folder=tmp_path / "empty", resume=True).history) == 2


def test_non_finite_meta_loss_stops(tmp_path):
  def meta_loss(h):
    return jnp.sum(h["w"] ** 2) + jnp.log(h["s"])  # log of a negative number: NaN

  hparams = {"w": jnp.ones(3, jnp.float32), "s": jnp.float32(-1.0)}
  with pytest.raises(FloatingPointError, match="meta-iteration 0"):
    _meta.meta_optimize(
        meta_loss, hparams, num_iterations=3, checkpoint_dir=tmp_path, progress=False)
  history = json.loads((tmp_path / _meta.HISTORY_FILE).read_text())
  assert len(history) == 1 and np.isnan(history[0]["meta_loss"])


def test_argument_errors(tmp_path):
  with pytest.raises(TypeError, match="meta_loss_fn"):
    _meta.meta_optimize(None, start(), num_iterations=1)
  with pytest.raises(TypeError, match="num_iterations"):
    _meta.meta_optimize(quadratic, start(), num_iterations=2.0)
  with pytest.raises(ValueError, match="checkpoint_every"):
    _meta.meta_optimize(quadratic, start(), num_iterations=2, checkpoint_every=0)
  with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
    _meta.meta_optimize(quadratic, start(), num_iterations=2, resume=True)
  (tmp_path / "ckpt_00000001.npz").write_bytes(b"")
  np.savez(tmp_path / "ckpt_00000002.npz", x=np.zeros(1))
  with pytest.raises(ValueError, match="no checkpoint .* can be read.*not a revhyper"):
    _meta.meta_optimize(
        quadratic, start(), num_iterations=2, checkpoint_dir=tmp_path, resume=True)


# ------------------------------------------------------------------------------------------------
# Stochastic meta-objectives, failures inside a step, damaged checkpoints, the paper's Adam


def noisy_training_meta_loss(h, key):
  """Like ``tiny_training_meta_loss``, but every key draws new initial noise and minibatches."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=64), jnp.int32)
  x_valid = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32) + x  # correlated with train
  noise_key, batch_key = jax.random.split(key)
  params = _models.mlp_init_from_noise(_models.mlp_noise(noise_key, (8, 3)), h["log_scale"])

  def loss(p, _, t):
    idx = jax.random.randint(jax.random.fold_in(batch_key, t), (16,), 0, 64)
    return _models.softmax_cross_entropy(_models.mlp_apply(p, x[idx]), y[idx])

  out = revhyper.sgd(loss, params, None, num_steps=6,
                     learning_rate=_hyper.learning_rate_from_log(h["log_alpha"]),
                     momentum=_hyper.momentum_from_logit(h["logit_gamma"]), method="unroll")
  return _models.softmax_cross_entropy(_models.mlp_apply(out.params, x_valid), y)


def test_keyed_meta_loss_gets_a_new_key_per_iteration_and_traces_once(tmp_path):
  seen, traces = [], []

  def meta_loss(h, key):
    traces.append(1)
    jax.debug.callback(lambda k: seen.append(np.asarray(k)), jax.random.key_data(key))
    return quadratic(h)

  key = jax.random.key(3)
  _meta.meta_optimize(meta_loss, start(), num_iterations=3, key=key, progress=False)
  assert len(traces) == 1
  expected = [np.asarray(jax.random.key_data(jax.random.fold_in(key, i))) for i in range(3)]
  assert len(seen) == 3 and all((a == b).all() for a, b in zip(seen, expected))
  # The one-argument form is untouched by the new argument.
  assert len(_meta.meta_optimize(quadratic, start(), num_iterations=2, progress=False).history) == 2


@pytest.mark.slow
def test_reseeded_resume_is_bit_identical(tmp_path):
  key = jax.random.key(7)
  full = run(tmp_path / "full", 6, meta_loss=noisy_training_meta_loss, key=key)
  run(tmp_path / "stopped", 2, meta_loss=noisy_training_meta_loss, key=key)
  resumed = run(tmp_path / "stopped", 6, meta_loss=noisy_training_meta_loss, key=key,
                resume=True)
  assert_same_run(full, resumed)


def diverging_meta_loss(h):
  """Training with e^8 as the learning rate: the weights leave the exact fixed-point range."""
  params = {"w": jnp.ones(4, jnp.float32)}

  def loss(p, _, t):
    return jnp.sum(p["w"] ** 4)

  out = revhyper.sgd(loss, params, None, num_steps=20, learning_rate=jnp.exp(h["log_alpha"]),
                     momentum=0.9)
  return jnp.sum(out.params["w"] ** 2)


def test_diverging_training_raises_floating_point_error_after_writing_history(tmp_path):
  with pytest.raises(FloatingPointError, match="meta-iteration 0"):
    _meta.meta_optimize(diverging_meta_loss, {"log_alpha": jnp.float32(8.0)}, num_iterations=3,
                        checkpoint_dir=tmp_path, progress=False)
  assert (tmp_path / _meta.HISTORY_FILE).exists()
  history = json.loads((tmp_path / _meta.HISTORY_FILE).read_text())
  # Either the core flagged the run with NaN outputs (one entry, NaN) or it raised from the
  # step (no finished iteration).
  assert len(history) <= 1 and all(not np.isfinite(r["meta_loss"]) for r in history)


def test_a_step_error_is_chained_into_floating_point_error(tmp_path):
  def meta_loss(h):
    def fail(x):
      raise revhyper.ReversalError("fixed-point overflow in the forward pass")
    jax.debug.callback(fail, h["s"])
    return quadratic(h)

  with pytest.raises(FloatingPointError, match="fixed-point overflow") as info:
    _meta.meta_optimize(meta_loss, start(), num_iterations=2, checkpoint_dir=tmp_path,
                        progress=False)
  assert isinstance(info.value.__cause__, (jax.errors.JaxRuntimeError, revhyper.ReversalError))
  assert json.loads((tmp_path / _meta.HISTORY_FILE).read_text()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_names_its_path_and_resume_falls_back(tmp_path, damage, caplog):
  full = run(tmp_path / "full", 6, meta_loss=quadratic, hparams=start)
  folder = tmp_path / "damaged"
  run(folder, 4, meta_loss=quadratic, hparams=start)  # checkpoints after 2 and 4
  newest = folder / "ckpt_00000004.npz"
  data = newest.read_bytes()
  newest.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"not a zip file" * 9)
  like = (start(), optax.adam(0.04).init(start()))
  with pytest.raises(ValueError, match=str(newest)):
    _meta.load_checkpoint(newest, *like)
  with caplog.at_level(logging.WARNING):
    resumed = run(folder, 6, meta_loss=quadratic, hparams=start, resume=True)
  assert any(str(newest) in r.getMessage() for r in caplog.records)
  assert resumed.history[2]["iteration"] == 2  # restarted after iteration 2
  assert_same_run(full, resumed)


def test_paper_adam_follows_the_authors_update():
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=5).astype(np.float32) for _ in range(6)]
  b1, b2, eps, lam, lr = 0.1, 0.01, 1e-4, 1e-4, 0.04
  x, m, v = np.zeros(5), np.zeros(5), np.zeros(5)
  expected = []
  for i, g in enumerate(grads):  # the authors' loop, written out in numpy
    b1t = 1 - (1 - b1) * lam ** i
    m = b1t * g + (1 - b1t) * m
    v = b2 * g ** 2 + (1 - b2) * v
    x = x - lr * (m / (1 - (1 - b1) ** (i + 1))) / (np.sqrt(v / (1 - (1 - b2) ** (i + 1))) + eps)
    expected.append(x.copy())
  opt = _meta.paper_adam()
  params = jnp.zeros(5, jnp.float32)
  state = opt.init(params)
  for g, want in zip(grads, expected):
    updates, state = opt.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, want, rtol=2e-5, atol=1e-6)
