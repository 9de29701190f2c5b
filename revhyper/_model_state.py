"""Model state through training: running averages of per-step statistics (BatchNorm's).

A BatchNorm layer keeps, besides its weights, running averages of the batch statistics it
computes at every step,

    r_{t+1} = decay * r_t + (1 - decay) * s_t(w_t),

and evaluation reads them, which is where a meta-objective reads the model. Such an average is
the same kind of object as momentum: a rational decay plus an increment computed from the
current weights. The exact engine keeps it like an optimizer state: on an integer grid, the
decay a rational ``n / 2**31`` whose lost bits go onto a bit stack of its own, the increment
added and, in the reverse pass, subtracted after recomputing ``s_t`` bit for bit from the
rebuilt ``w_t``. The float methods carry the same recursion in floats.

``loss_fn`` returns ``(loss, statistics)``; ``RunningAverage`` says how to average them and
where the averages start. With ``in_loss=True`` the loss also reads the running averages
(``loss_fn(params, hparams, t, running)``), as a model that normalises with them during
training does: they are then read-only state of the step. The statistics must not depend on
the averages they update (checked from the loss's data flow), or the step could not be undone.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from revhyper import _optim
from revhyper import _schedules

# 2**-40 resolves a statistic of order 1 forty bits below its leading one, far finer than
# float32's 24, and leaves the range |r| < 2**21 (about two million): batch means and variances
# of normalised networks' pre-activations are orders of magnitude inside it.
DEFAULT_FRACTIONAL_BITS = 40


@dataclasses.dataclass(frozen=True, eq=False)
class RunningAverage:
  """Running averages of the statistics that ``loss_fn`` returns, carried through training.

  With ``model_state=RunningAverage(initial, decay)``, ``loss_fn`` returns ``(loss,
  statistics)``, ``statistics`` a pytree of float arrays with the structure and shapes of
  ``initial`` (BatchNorm's batch means and variances, for instance), and every step updates

      running = decay * running + (1 - decay) * statistics

  (flax's and Equinox's ``momentum`` convention). The final averages are returned as
  ``result.model_state``, differentiable with respect to everything, like the final params.

  Attributes:
    initial: a pytree of float arrays, the averages before the first step (BatchNorm: means
      at 0, variances at 1).
    decay: the averages' decay in ``[0, 1]``: a scalar, a ``[num_steps]`` schedule, a pytree
      like ``initial`` of those, or a function of the step. Differentiable. The exact method
      rounds ``1 - decay`` to a multiple of ``2**-31`` (as it does Adam's ``1 - b2``), and
      every method trains with the rounded value; a decay below ``2**-8`` is clipped to it
      (with a warning), since a factor of 0 erases the average and cannot be undone.
    in_loss: the loss reads the running averages: ``loss_fn(params, hparams, t, running)``.
      The statistics must then not depend on ``running``.
    fractional_bits: the exact method's grid for the averages, ``2**-fractional_bits``, whose
      range is ``|running| < 2**(61 - fractional_bits)`` (default 40: resolution 9e-13,
      range 2e6). A value outside the range fails the run like a fixed-point overflow.
  """

  initial: Any
  decay: Any = 0.99
  in_loss: bool = False
  fractional_bits: int = DEFAULT_FRACTIONAL_BITS

  def __post_init__(self):
    if not isinstance(self.in_loss, bool):
      raise ValueError(f"model_state.in_loss must be a bool, got {self.in_loss!r}.")
    if (isinstance(self.fractional_bits, bool) or not isinstance(self.fractional_bits, int)
        or not 8 <= self.fractional_bits <= 60):
      raise ValueError(f"model_state.fractional_bits must be an int in [8, 60], got "
                       f"{self.fractional_bits!r}.")


class Running(NamedTuple):
  """A ``RunningAverage`` validated for one run: flattened, its decay quantized."""

  leaves: list  # the initial averages, strongly typed
  treedef: Any
  decay: list  # per leaf, [T] factors 1 - amount, in the leaf's compute dtype
  one_minus_decay: list  # per leaf, [T] amounts (the increment's weight), likewise
  numerators: list  # per leaf, uint32 [T]: the factor as n / 2**31
  invalid: Any  # bool []: a traced decay outside [0, 1]
  in_loss: bool
  fractional_bits: int


def prepare(model_state, num_steps, flatten_like_floats, compute_dtype):
  """Validates ``model_state`` (a ``RunningAverage`` or None) into a ``Running`` (or None).

  Args:
    flatten_like_floats: ``(tree, name) -> (leaves, treedef)``, the argument checks that
      ``params`` gets (float arrays, finite where concrete), applied to ``initial``.
    compute_dtype: a leaf dtype -> the dtype its update is computed in.
  """
  if model_state is None:
    return None
  if not isinstance(model_state, RunningAverage):
    raise ValueError(f"model_state must be a revhyper.RunningAverage(initial, decay=...), got "
                     f"{type(model_state).__name__}.")
  leaves, treedef = flatten_like_floats(model_state.initial, "model_state.initial")
  if not leaves:
    raise ValueError("model_state.initial must contain at least one array.")
  template = jax.tree_util.tree_unflatten(treedef, leaves)
  # Like an optimizer's coefficient: a scalar, [T], a pytree like initial, or a function of t.
  schedule = _optim.schedule_of(model_state.decay, template, num_steps, "model_state.decay")
  _schedules.check_range(schedule, "model_state.decay", 0, 1)
  invalid = _schedules.outside(schedule.arrays, 0, 1)
  quantized = _schedules.quantize_decay(
      _schedules.combine(lambda b: 1 - b, schedule), "model_state.decay")
  compute = [compute_dtype(jnp.result_type(x)) for x in leaves]
  amounts = [a.astype(d) for a, d in zip(quantized.amounts, compute)]
  return Running(
      leaves=leaves,
      treedef=treedef,
      decay=[1 - a for a in amounts],
      one_minus_decay=amounts,
      numerators=quantized.numerators,
      invalid=invalid,
      in_loss=model_state.in_loss,
      fractional_bits=model_state.fractional_bits,
  )


def check_statistics(out_tree, out_avals, running):
  """Raises a clear ``ValueError`` unless the statistics match the running averages.

  Args:
    out_tree: the treedef of the statistics ``loss_fn`` returned.
    out_avals: their abstract values, in leaf order.
    running: the ``Running`` they update.
  """
  expected = running.treedef
  if out_tree != expected:
    raise ValueError(
        "the statistics loss_fn returns (the second element of (loss, statistics)) must have "
        f"the structure of model_state.initial: got {out_tree}, expected {expected}.")
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree_util.tree_unflatten(expected, running.leaves))[0]]
  for path, aval, leaf in zip(paths, out_avals, running.leaves):
    if tuple(aval.shape) != tuple(jnp.shape(leaf)):
      raise ValueError(
          f"the statistic statistics{path} that loss_fn returns has shape {tuple(aval.shape)}, "
          f"but model_state.initial{path} has shape {tuple(jnp.shape(leaf))}: a statistic "
          "must keep the shape of its running average at every step.")
    if not jnp.issubdtype(aval.dtype, jnp.floating):
      raise ValueError(f"the statistic statistics{path} that loss_fn returns must be a float "
                       f"array, got dtype {aval.dtype}.")
