"""The meta-optimisation loop: gradient steps on hyperparameters, with logs and checkpoints.

The meta-loss is any differentiable function of a pytree of hyperparameters; with revhyper it
is typically a validation loss after ``revhyper.sgd``, whose hypergradient the reversible method
computes exactly. The loop is plain Python around one jit-compiled step (value, hypergradient,
optax update), so it is compiled once and every iteration is cheap to log and checkpoint.

A stochastic meta-objective (a new draw of initial weights and minibatches at every
meta-iteration, as in the paper's schedule experiments) takes a PRNG key: with ``key=`` the loop
calls ``meta_loss_fn(hparams, key_i)`` with ``key_i = jax.random.fold_in(key, i)`` at iteration
``i``. The key is a function of the iteration alone, so the step still compiles once and a
resumed run still repeats an uninterrupted one bit for bit.

Checkpoints are single ``.npz`` files (``ckpt_00000010.npz`` after 10 iterations) holding the
flattened leaves of the hyperparameters and the optimizer state, plus a JSON record of the
iteration, the tree structures and the history. Each is written to a temporary file and then
renamed into place, so a crash leaves either the old checkpoint or the new one, never half of
one. Resuming restores the exact arrays, so a resumed run gives bit-identical results to an
uninterrupted one. A checkpoint that cannot be read (truncated, overwritten) is skipped with a
warning, and the run resumes from the newest intact one.

Several processes (``jax.distributed.initialize``) run the same loop, each calling
``meta_optimize`` with the same arguments: the step is one program over every process's
devices. Only process 0 writes the history and the checkpoints; every process reads them to
resume, so ``checkpoint_dir`` must be a folder that they share. Before the first step the
processes check that they start from the same iteration, hyperparameters, optimizer state and
key, and the state goes through the host after every step on every process, so that a resumed
run feeds the step the same arrays as an uninterrupted one.
"""

import glob
import json
import math
import os
import re
import time
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from revhyper._errors import ReversalError

PathLike = Union[str, os.PathLike]

_PAPER_META_LEARNING_RATE = 0.04  # Adam step size of the paper's MNIST experiments (section 3.1)
# What a failed exact run raises from inside a compiled step: the core's error, which a host
# callback re-raises as a JAX runtime error.
_STEP_ERRORS = (ReversalError, jax.errors.JaxRuntimeError)
_CHECKPOINT_FORMAT = 1
_CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d{8})\.npz")
HISTORY_FILE = "history.json"


class MetaResult(NamedTuple):
  """What ``meta_optimize`` returns."""

  hparams: Any  # the hyperparameters after the last iteration (pytree like the input)
  opt_state: Any  # the optimizer state after the last iteration
  history: list  # one JSON-serialisable dict per iteration (see ``meta_optimize``)


class MetaStep(NamedTuple):
  """What ``meta_optimize`` passes to its callback after each iteration."""

  iteration: int  # 0-based index of the iteration just run
  hparams: Any  # the hyperparameters the meta-loss and hypergradient were evaluated at
  hypergrad: Any  # the hypergradient, a pytree like hparams
  aux: Any  # the auxiliary output of the meta-loss (None without has_aux)
  record: dict  # the history entry of this iteration


def meta_optimize(
    meta_loss_fn: Callable[[Any], Any],
    hparams: Any,
    *,
    num_iterations: int,
    optimizer: Optional[optax.GradientTransformation] = None,
    checkpoint_dir: Optional[PathLike] = None,
    checkpoint_every: int = 5,
    resume: bool = False,
    log_every: int = 1,
    progress: bool = True,
    has_aux: bool = False,
    callback: Optional[Callable[[MetaStep], None]] = None,
    key: Optional[jax.Array] = None,
) -> MetaResult:
  """Minimises ``meta_loss_fn`` over hyperparameters with an optax optimizer.

  Each iteration evaluates the meta-loss and its hypergradient at the current hyperparameters
  and applies one optimizer update. The step (value, gradient and update) is jit-compiled once
  per call; the first iteration's time includes the compilation.

  History: one dict per iteration, ``{"iteration": i, "meta_loss": float, "hypergrad_norm":
  float (global L2 norm), "seconds": float, "aux": {name: scalar}}``; ``aux`` holds the scalar
  leaves of the auxiliary output, named by their path (``"train/loss"``). With
  ``checkpoint_dir`` the history is also written to ``checkpoint_dir/history.json`` after every
  iteration.

  Logging: every ``log_every`` iterations one line (iteration, meta-loss, hypergradient norm,
  seconds, time left) goes to absl logging at INFO. Outside an absl app INFO is hidden; there
  ``progress=True`` prints the line instead, so the loop shows progress in scripts and
  notebooks.

  Args:
    meta_loss_fn: ``hparams -> scalar`` meta-loss, or ``hparams -> (scalar, aux)`` with
      ``has_aux=True``; differentiable with ``jax.grad``, traceable with ``jax.jit``. With
      ``key`` it takes a second argument, ``meta_loss_fn(hparams, key_i)``.
    hparams: the initial hyperparameters, any pytree of floating arrays.
    num_iterations: the total number of iterations (those restored from a checkpoint count).
    optimizer: an optax GradientTransformation; the default is ``optax.adam(0.04)``: Adam with
      the step size of the paper's MNIST experiments. The authors' code used its own Adam
      variant, ``paper_adam(0.04)``.
    checkpoint_dir: a folder for checkpoints and ``history.json``; None keeps nothing on disk.
      With several processes only process 0 writes there, and every process reads it to
      resume: a folder they share.
    checkpoint_every: write a checkpoint every this many iterations, and after the last one.
    resume: continue from the latest checkpoint in ``checkpoint_dir`` (starting afresh when it
      holds none). Without it, a ``checkpoint_dir`` that already holds checkpoints is an error,
      so that an old run is never mixed into a new one.
    log_every: log every this many iterations (and after the last); 0 never logs.
    progress: print the log lines when absl logging hides INFO.
    has_aux: whether ``meta_loss_fn`` returns ``(loss, aux)``.
    callback: called as ``callback(MetaStep(...))`` after each iteration, before its
      checkpoint; an exception raised there stops the loop (checkpoints already written stay).
    key: a JAX PRNG key for a stochastic meta-objective; iteration ``i`` passes
      ``jax.random.fold_in(key, i)`` to ``meta_loss_fn``. None (the default) calls
      ``meta_loss_fn(hparams)``.

  Returns:
    ``MetaResult(hparams, opt_state, history)``.

  Raises:
    TypeError: ``meta_loss_fn`` or ``callback`` is not callable, or an integer argument is not
      an int.
    ValueError: an integer argument is out of range; ``resume`` without ``checkpoint_dir``; a
      checkpoint whose tree structure, shapes or dtypes do not match ``hparams`` and
      ``optimizer``, or that is past ``num_iterations``; ``checkpoint_dir`` holds checkpoints
      and none of them can be read.
    FileExistsError: ``checkpoint_dir`` holds checkpoints and ``resume`` is False.
    RuntimeError: with several processes, they start from different iterations,
      hyperparameters, optimizer states or keys (e.g. ``checkpoint_dir`` is not shared).
    FloatingPointError: the meta-loss or hypergradient is not finite (the update is not
      applied; the history, with that iteration, is written first), or the step raised
      ``revhyper.ReversalError`` or a JAX runtime error (a training run that left the exact
      range, e.g. a diverging learning rate): the history so far is written first, and the
      original error is chained with its message.

  Example:
    >>> def meta_loss(h):
    ...   return jnp.sum((h["log_alpha"] - 1.0) ** 2)
    >>> result = meta_optimize(meta_loss, {"log_alpha": jnp.zeros(3)}, num_iterations=50,
    ...                        progress=False)
    >>> result.history[-1]["meta_loss"] < result.history[0]["meta_loss"]
    True
  """
  num_iterations, checkpoint_every, log_every, optimizer = _check_arguments(
      meta_loss_fn, callback, num_iterations, checkpoint_every, log_every, resume,
      checkpoint_dir, optimizer)
  checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
  start, hparams, opt_state, history = _start_or_resume(
      checkpoint_dir, resume, optimizer, hparams, num_iterations, progress)
  several = jax.process_count() > 1
  if several:
    _check_processes_agree(start, hparams, opt_state, key)
  # Every process reads checkpoint_dir; one writes it.
  write_dir = checkpoint_dir if jax.process_index() == 0 else None
  step = _make_step(meta_loss_fn, optimizer, has_aux, key)
  run_start = time.perf_counter()
  for it in range(start, num_iterations):
    new_hparams, new_opt_state, grads, aux, record = _evaluate(
        step, hparams, opt_state, it, history, write_dir)
    if log_every and ((it + 1) % log_every == 0 or it + 1 == num_iterations):
      _log_iteration(record, start, num_iterations, time.perf_counter() - run_start, progress)
    if callback is not None:
      callback(MetaStep(it, hparams, grads, aux, record))
    hparams, opt_state = new_hparams, new_opt_state
    if several:
      # The step's outputs span every process's devices, and a resumed run starts from host
      # arrays: feeding the step host arrays always keeps one compiled program and the same
      # inputs either way. Process 0 can then write them alone.
      hparams, opt_state = _canonical((hparams, opt_state))
    if write_dir is not None:
      _write_json(os.path.join(write_dir, HISTORY_FILE), history)
      if (it + 1) % checkpoint_every == 0 or it + 1 == num_iterations:
        save_checkpoint(write_dir, it + 1, hparams, opt_state, history)
  return MetaResult(hparams, opt_state, history)


def _check_arguments(meta_loss_fn, callback, num_iterations, checkpoint_every, log_every,
                     resume, checkpoint_dir, optimizer):
  """``meta_optimize``'s arguments checked: ``(num_iterations, checkpoint_every, log_every,
  optimizer)``, the integers as ints and the default optimizer filled in."""
  if not callable(meta_loss_fn):
    raise TypeError(f"meta_loss_fn must be callable, got {meta_loss_fn!r}")
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable or None, got {callback!r}")
  num_iterations = _check_int(num_iterations, "num_iterations", minimum=0)
  checkpoint_every = _check_int(checkpoint_every, "checkpoint_every", minimum=1)
  log_every = _check_int(log_every, "log_every", minimum=0)
  if resume and checkpoint_dir is None:
    raise ValueError("resume=True needs a checkpoint_dir to resume from")
  optimizer = optax.adam(_PAPER_META_LEARNING_RATE) if optimizer is None else optimizer
  return num_iterations, checkpoint_every, log_every, optimizer


def _start_or_resume(checkpoint_dir, resume, optimizer, hparams, num_iterations, progress):
  """``(start, hparams, opt_state, history)``: a fresh start, or the newest intact checkpoint.

  Creates ``checkpoint_dir`` when it is given; refuses one that holds checkpoints unless
  ``resume``.
  """
  # Start and resume go through the same host round trip, so both feed the compiled step
  # arrays of identical dtypes and weak types: no retracing, and bit-identical results.
  hparams = _canonical(hparams)
  opt_state = _canonical(optimizer.init(hparams))
  start, history = 0, []
  if checkpoint_dir is None:
    return start, hparams, opt_state, history
  latest = latest_checkpoint(checkpoint_dir)
  if latest is not None and not resume:
    raise FileExistsError(
        f"checkpoint_dir {checkpoint_dir!r} already holds checkpoints ({latest!r}); "
        "pass resume=True to continue that run, or use an empty folder")
  if latest is not None:
    latest, (start, hparams, opt_state, history) = _load_newest_intact(
        checkpoint_dir, hparams, opt_state)
    if start > num_iterations:
      raise ValueError(
          f"the checkpoint {latest!r} is after iteration {start}, past "
          f"num_iterations={num_iterations}")
    _emit(f"resuming from {latest} after iteration {start}", progress)
  os.makedirs(checkpoint_dir, exist_ok=True)
  return start, hparams, opt_state, history


def _check_processes_agree(start, hparams, opt_state, key):
  """Raises ``RuntimeError`` on every process unless all start from process 0's state.

  Also a barrier: no process writes a checkpoint before every one has read the folder.
  """
  if key is not None and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  state = [np.asarray(x) for x in jax.tree.leaves((np.int32(start), hparams, opt_state, key))]
  expected = multihost_utils.broadcast_one_to_all(state)
  # Bit for bit (NaNs included), in each array's own dtype.
  same = all(a.tobytes() == np.asarray(b).astype(a.dtype).tobytes()
             for a, b in zip(state, expected))
  agree = np.asarray(multihost_utils.process_allgather(np.bool_(same)))
  if not agree.all():
    raise RuntimeError(
        f"meta_optimize: processes {np.flatnonzero(~agree).tolist()} start from another "
        "iteration, hyperparameters, optimizer state or key than process 0; every process "
        "must call meta_optimize with the same arguments, and resume from a checkpoint_dir "
        "that they share")


def _evaluate(step, hparams, opt_state, it, history, checkpoint_dir):
  """Runs iteration ``it`` and appends its record to ``history``.

  Returns ``(new_hparams, new_opt_state, hypergrad, aux, record)``. A failed or non-finite
  step raises ``FloatingPointError`` after writing the history (with the failed iteration
  when it produced numbers), so that the finished iterations stay on disk.
  """
  tic = time.perf_counter()
  try:
    new_hparams, new_opt_state, loss, grads, grad_norm, aux = step(
        hparams, opt_state, np.int32(it))
    record = {
        "iteration": it,
        "meta_loss": float(loss),  # float() waits for the step, so the time below is true
        "hypergrad_norm": float(grad_norm),
        "seconds": time.perf_counter() - tic,
        "aux": _scalar_leaves(aux),
    }
  except _STEP_ERRORS as error:
    # A training run inside the step failed (e.g. it diverged out of the exact range): the
    # finished iterations are kept on disk, and the caller sees the one error type this
    # loop promises for values gone bad.
    if checkpoint_dir is not None:
      _write_json(os.path.join(checkpoint_dir, HISTORY_FILE), history)
    # A collective whose peer died fails here too, with an error of the same type.
    also = ("; with several processes, another process may have died: see its log"
            if jax.process_count() > 1 else "")
    raise FloatingPointError(
        f"meta-iteration {it}: the meta-loss or its hypergradient failed{also}: "
        f"{error}") from error
  history.append(record)
  if not (math.isfinite(record["meta_loss"]) and math.isfinite(record["hypergrad_norm"])):
    if checkpoint_dir is not None:
      _write_json(os.path.join(checkpoint_dir, HISTORY_FILE), history)
    raise FloatingPointError(
        f"meta-iteration {it}: meta-loss {record['meta_loss']}, hypergradient norm "
        f"{record['hypergrad_norm']}; the update was not applied")
  return new_hparams, new_opt_state, grads, aux, record


def _log_iteration(record, start, num_iterations, elapsed, progress):
  """Logs one progress line; the time left extrapolates this run's iterations so far."""
  it = record["iteration"]
  left = elapsed / (it + 1 - start) * (num_iterations - it - 1)
  _emit(
      f"meta-iteration {it + 1}/{num_iterations}: meta-loss {record['meta_loss']:.6g}, "
      f"|hypergradient| {record['hypergrad_norm']:.3g}, {record['seconds']:.2f} s "
      f"(about {left:.0f} s left)", progress)


def _make_step(meta_loss_fn, optimizer, has_aux, key):
  value_and_grad = jax.value_and_grad(meta_loss_fn, has_aux=has_aux)

  @jax.jit
  def step(hparams, opt_state, iteration):
    # The iteration is a traced argument, so a new key per iteration does not retrace.
    args = (hparams,) if key is None else (hparams, jax.random.fold_in(key, iteration))
    if has_aux:
      (loss, aux), grads = value_and_grad(*args)
    else:
      (loss, grads), aux = value_and_grad(*args), None
    updates, opt_state = optimizer.update(grads, opt_state, hparams)
    new_hparams = optax.apply_updates(hparams, updates)
    return new_hparams, opt_state, loss, grads, optax.tree.norm(grads), aux

  return step


# ------------------------------------------------------------------------------------------------
# The paper's meta-optimiser


class PaperAdamState(NamedTuple):
  """State of ``paper_adam``."""

  count: jax.Array  # int32 []: updates applied so far
  mu: Any  # first-moment estimate, a pytree like the parameters
  nu: Any  # second-moment estimate, a pytree like the parameters


def paper_adam(
    learning_rate: float = _PAPER_META_LEARNING_RATE,
    b1: float = 0.1,
    b2: float = 0.01,
    eps: float = 1e-4,
    lam: float = 1e-4,
) -> optax.GradientTransformation:
  """The Adam variant the paper's code used as its meta-optimiser, as an optax transformation.

  The authors' ``optimizers.adam`` (HIPS/hypergrad) writes the decays in the (1 - beta)
  convention and lets the first-moment weight decay geometrically with the step count i
  (from 0)::

      b1_i = 1 - (1 - b1) * lam**i
      m = b1_i * g + (1 - b1_i) * m          v = b2 * g**2 + (1 - b2) * v
      m_hat = m / (1 - (1 - b1)**(i + 1))     v_hat = v / (1 - (1 - b2)**(i + 1))
      update = -learning_rate * m_hat / (sqrt(v_hat) + eps)

  With lam = 1e-4, b1_i is 1 from the second step on: m is the latest gradient, the method is
  nearly RMSprop (second-moment decay 0.99), and the first-moment bias correction (for 0.9)
  makes the early steps large (5.3 times the plain RMSprop step at i = 1). optax's
  ``adam(0.04)`` with its defaults (b1 = 0.9, b2 = 0.999, eps = 1e-8) is a different method.

  Args:
    learning_rate: the step size (0.04 in the paper's MNIST schedule experiments).
    b1: one minus the first-moment decay at the first step (the authors' default 0.1).
    b2: one minus the second-moment decay (0.01).
    eps: added to the root of the second moment (1e-4).
    lam: how fast the first-moment decay vanishes over steps (1e-4).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> opt = paper_adam()
    >>> state = opt.init({"a": jnp.zeros(2)})
    >>> updates, state = opt.update({"a": jnp.array([1.0, -2.0])}, state)
    >>> np.round(np.asarray(updates["a"]), 4)  # the first step is -lr * sign(g), less eps
    array([-0.04,  0.04], dtype=float32)
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return PaperAdamState(jnp.zeros((), jnp.int32), zeros, zeros)

  def update(updates, state, params=None):
    del params
    i = state.count.astype(jnp.float32)
    b1_i = 1.0 - (1.0 - b1) * lam ** i
    mu = jax.tree.map(lambda g, m: b1_i * g + (1.0 - b1_i) * m, updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * g ** 2 + (1.0 - b2) * v, updates, state.nu)
    mu_scale = 1.0 / (1.0 - (1.0 - b1) ** (i + 1.0))  # bias corrections
    nu_scale = 1.0 / (1.0 - (1.0 - b2) ** (i + 1.0))
    steps = jax.tree.map(
        lambda m, v: (-learning_rate * mu_scale * m / (jnp.sqrt(nu_scale * v) + eps)).astype(
            m.dtype), mu, nu)
    return steps, PaperAdamState(state.count + 1, mu, nu)

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    checkpoint_dir: PathLike, iteration: int, hparams: Any, opt_state: Any, history: list
) -> str:
  """Writes the state after ``iteration`` iterations to ``checkpoint_dir``, atomically.

  Args:
    checkpoint_dir: an existing folder.
    iteration: the number of iterations completed.
    hparams: the hyperparameters, a pytree of arrays.
    opt_state: the optimizer state, a pytree of arrays.
    history: the JSON-serialisable history so far.

  Returns:
    The path written, ``checkpoint_dir/ckpt_<iteration, 8 digits>.npz``.

  Example:
    >>> path = save_checkpoint("/tmp/run", 10, hparams, opt_state, history)  # doctest: +SKIP
  """
  checkpoint_dir = os.fspath(checkpoint_dir)
  h_leaves, h_tree = jax.tree.flatten(hparams)
  o_leaves, o_tree = jax.tree.flatten(opt_state)
  meta = {
      "format": _CHECKPOINT_FORMAT,
      "iteration": iteration,
      "hparams_tree": str(h_tree),
      "opt_state_tree": str(o_tree),
      "history": history,
  }
  arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
  arrays.update({f"hparams_{i}": np.asarray(x) for i, x in enumerate(h_leaves)})
  arrays.update({f"opt_state_{i}": np.asarray(x) for i, x in enumerate(o_leaves)})
  path = os.path.join(checkpoint_dir, f"ckpt_{iteration:08d}.npz")
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())  # on disk before the rename makes it the latest checkpoint
  os.replace(tmp, path)
  return path


def load_checkpoint(path: PathLike, hparams_like: Any, opt_state_like: Any):
  """Reads a checkpoint written by ``save_checkpoint``, checking it against the expected trees.

  Args:
    path: the checkpoint file.
    hparams_like: a pytree with the structure, shapes and dtypes the hyperparameters must have.
    opt_state_like: the same for the optimizer state (e.g. ``optimizer.init(hparams)``).

  Returns:
    ``(iteration, hparams, opt_state, history)``, the arrays as JAX arrays.

  Raises:
    ValueError: the file cannot be read (truncated, not a zip archive, missing arrays) or is not
      such a checkpoint, or its tree structure, leaf shapes or dtypes differ from the expected
      ones; the message names the file and says which.

  Example:
    >>> it, hparams, opt_state, history = load_checkpoint(
    ...     latest_checkpoint("/tmp/run"), hparams, optimizer.init(hparams))  # doctest: +SKIP
  """
  path = os.fspath(path)
  meta, arrays = _read_checkpoint(path)
  restored = []
  for name, like in (("hparams", hparams_like), ("opt_state", opt_state_like)):
    leaves, tree = jax.tree.flatten(like)
    if meta[f"{name}_tree"] != str(tree):
      raise ValueError(
          f"{path}: the checkpoint's {name} have tree structure {meta[f'{name}_tree']}, "
          f"this run's have {tree}")
    loaded = []
    for i, leaf in enumerate(leaves):
      saved = arrays.get(f"{name}_{i}")
      if saved is None:
        raise _UnreadableCheckpoint(f"{path}: {name} leaf {i} is missing from the checkpoint")
      expected = (np.shape(leaf), jnp.asarray(leaf).dtype)
      if (saved.shape, saved.dtype) != expected:
        raise ValueError(
            f"{path}: {name} leaf {i} is {saved.dtype} {list(saved.shape)} in the checkpoint, "
            f"{expected[1]} {list(expected[0])} in this run")
      loaded.append(saved)
    restored.append(_canonical(jax.tree.unflatten(tree, loaded)))
  return meta["iteration"], restored[0], restored[1], meta["history"]


class _UnreadableCheckpoint(ValueError):
  """A checkpoint file that cannot be read at all, as opposed to one of another run."""


def _read_checkpoint(path: str):
  """``(meta, arrays)`` of a checkpoint file; ``_UnreadableCheckpoint`` naming it if broken."""
  try:
    # Our own handle: np.load leaves the file open when it fails to parse it.
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
      if "meta" not in data.files:
        raise _UnreadableCheckpoint(f"{path}: not a revhyper meta-optimisation checkpoint")
      meta = json.loads(data["meta"].tobytes().decode())
      arrays = {k: data[k] for k in data.files}
  except _UnreadableCheckpoint:
    raise
  # What numpy and zipfile raise on truncated or overwritten files (ValueError: a pickle or a
  # file that is no archive; KeyError: an entry listed but absent; EOFError: cut short;
  # TypeError: a plain .npy array, which is no archive to open).
  except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
    raise _UnreadableCheckpoint(
        f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from error
  if not isinstance(meta, dict) or meta.get("format") != _CHECKPOINT_FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else meta
    raise _UnreadableCheckpoint(f"{path}: unknown checkpoint format {found!r}")
  return meta, arrays


def _load_newest_intact(checkpoint_dir: str, hparams_like, opt_state_like):
  """``(path, load_checkpoint(path, ...))`` of the newest checkpoint that can be read.

  Unreadable ones are skipped with a warning that names them; a checkpoint of another run
  (tree structure, shapes, dtypes) is an error at once, never skipped.
  """
  problems = []
  for path in _checkpoints_newest_first(checkpoint_dir):
    try:
      return path, load_checkpoint(path, hparams_like, opt_state_like)
    except _UnreadableCheckpoint as error:
      logging.warning("Skipping an unreadable checkpoint: %s", error)
      problems.append(str(error))
  raise ValueError(
      f"no checkpoint in {checkpoint_dir!r} can be read: " + "; ".join(problems))


def _checkpoints_newest_first(checkpoint_dir: PathLike) -> list[str]:
  found = []
  for path in glob.glob(os.path.join(os.fspath(checkpoint_dir), "ckpt_*.npz")):
    match = _CHECKPOINT_PATTERN.fullmatch(os.path.basename(path))
    if match:
      found.append((int(match.group(1)), path))
  return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(checkpoint_dir: PathLike) -> Optional[str]:
  """The path of the checkpoint with the most iterations in a folder, or None if it has none.

  The file is not opened: ``meta_optimize(resume=True)`` falls back to an older checkpoint
  when this one cannot be read.

  Example:
    >>> latest_checkpoint("/no/such/folder") is None
    True
  """
  found = _checkpoints_newest_first(checkpoint_dir)
  return found[0] if found else None


# ------------------------------------------------------------------------------------------------
# Helpers


def _canonical(tree):
  """The arrays of ``tree`` as they come back from a checkpoint: strongly typed JAX arrays."""
  return jax.tree.map(lambda x: jnp.asarray(_to_host(jnp.asarray(x))), tree)


def _to_host(x):
  """``x`` as a numpy array; one that spans several processes is gathered from all of them
  (every process must then call this, in the same order)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _scalar_leaves(aux) -> dict:
  """The scalar leaves of ``aux`` as JSON-ready Python numbers, keyed by their tree path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
    value = np.asarray(leaf)
    if value.size == 1:
      name = "/".join(_key_name(k) for k in path) or "aux"
      out[name] = value.reshape(()).item()
  return out


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _emit(line: str, progress: bool) -> None:
  if logging.level_info():
    logging.info(line)
  elif progress:
    print(line, flush=True)


def _check_int(value, name: str, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {value}")
  return int(value)
