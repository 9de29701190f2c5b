"""Settings of experiments/adam_schedules.py (learned AdamW schedules): presets "paper" and
"quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # Data: train/valid/test sizes. Empty takes the data's own split: 5000/2500/2500 of the
  # bundled 10,000 digits, or 10k/10k/10k of full MNIST with mnist_dir; the launcher writes the
  # sizes it used into results.json's config.
  c.split = ()
  c.mnist_dir = ""  # a folder with the four MNIST IDX files; empty: the bundled digits
  c.layer_sizes = (784, 50, 50, 50, 10)
  c.num_steps = 100  # T
  c.batch_size = 200
  # Meta-optimisation: optax.adam with this step; meta-iteration i trains with seed 1 + i.
  c.meta_iterations = 40
  c.meta_step = 0.05
  c.seed = 0  # of the data split
  # Held-out evaluation: seeds 10,000 + k, never used while meta-training.
  c.eval_seeds = 20
  # The baseline: the best of these constant learning rates by mean validation error.
  c.grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  # Meta-training starts from the grid's best rate (False: from optax's default 1e-3). The
  # learned schedules then have the grid's information and the meta-steps on top of it.
  c.warm_start = True
  # Lower bound on b1, b2 and 1 - lr * wd: the reversible method sizes its bit stack from it
  # (they are traced), and learned values are clipped to it.
  c.min_decay = 0.5
  c.method = "reversible"  # or "unroll", "checkpoint": the same hypergradients
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.split = (1000, 500, 500)
    c.layer_sizes = (784, 20, 10)
    c.num_steps = 10
    c.batch_size = 50
    c.meta_iterations = 3
    c.eval_seeds = 3
    c.grid = (1e-3, 1e-2)
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
