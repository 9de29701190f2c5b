"""Tests of the hyperparameter parameterisations and of the meta-optimisation loop."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def test_default_optimizer_is_the_papers_adam_and_step_is_traced_once(capsys):
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
  with pytest.raises(ValueError, match="not a revhyper"):
    _meta.meta_optimize(
        quadratic, start(), num_iterations=2, checkpoint_dir=tmp_path, resume=True)
