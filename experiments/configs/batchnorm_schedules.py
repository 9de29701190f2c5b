"""Settings of experiments/batchnorm_schedules.py (a BatchNorm convnet's learned AdamW schedules
and augmentation): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # Data: train/valid/test sizes of the bundled 10,000 digits (or of full MNIST with
  # mnist_dir). Validation is the meta-objective and picks the baseline's rate; test is read
  # only by the held-out evaluation.
  c.split = (5000, 1000, 2500)
  c.mnist_dir = ""  # a folder with the four MNIST IDX files; empty: the bundled digits
  # The network: stage widths and residual blocks per stage (stem stride 2: 28x28 -> 14x14).
  c.channels = (8, 16)
  c.blocks_per_stage = 1
  c.bn_decay = 0.9  # the running statistics' decay
  c.num_steps = 100  # T
  c.batch_size = 32
  # Schedules: log learning rate and log weight decay per layer, each linear between this many
  # evenly spaced knots over the T steps.
  c.knots = 4
  c.initial_shift = 0.5  # the learned augmentation's starting shift sd, in pixels
  # Meta-optimisation: optax.adam with this step; meta-iteration i draws a fresh seed.
  # Start the learned rates at the grid's best constant rate (chosen on validation, as the
  # baseline is) rather than at optax's default 1e-3.
  c.warm_start = True
  c.meta_iterations = 30
  c.meta_step = 0.05
  c.seed = 0  # of the data split and of the seed streams
  c.eval_seeds = 20  # held-out evaluation: fresh seeds, never used while meta-training
  # The baseline: the best of these constant learning rates (optax's other defaults, no
  # augmentation) by mean validation error.
  c.grid = (1e-3, 3e-3, 1e-2, 3e-2)
  # Lower bound on 1 - lr * wd (traced): the reversible method sizes its bit stack from it.
  c.min_decay = 0.5
  c.method = "reversible"  # or "unroll", "checkpoint": the same hypergradients
  # Compile at XLA's backend optimisation level 0: about half the compile time, for runs
  # that compilation dominates.
  c.fast_compile = False
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.split = (500, 200, 200)
    c.channels = (4,)
    c.num_steps = 6
    c.batch_size = 16
    c.knots = 2
    c.meta_iterations = 2
    c.eval_seeds = 3
    c.grid = (1e-3, 1e-2)
    c.fast_compile = True
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
