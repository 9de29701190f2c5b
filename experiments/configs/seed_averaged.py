"""Settings of experiments/seed_averaged.py (figure 5): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # The authors' code (experiments/Feb_3_training_schedules/5_initial_gradient): the starting
  # point of the schedule experiment, its hypergradient with respect to log alpha_t and logit
  # gamma_t of every step and weight type, averaged over 100 seeds (each its own initial noise
  # and minibatches, drawn with replacement).
  c.num_train = 5000  # of the bundled digits (the paper's code: 10,000 of full MNIST)
  c.mnist_dir = ""
  c.layer_sizes = (784, 50, 50, 50, 10)
  c.num_steps = 100
  c.batch_size = 200
  c.batches = "with_replacement"  # or "epochs": revhyper.datasets.batch_indices
  c.log_learning_rate = -1.0
  c.momentum = 0.5
  c.log_init_scale = -3.0
  c.num_seeds = 100
  c.seed = 0
  c.chunk = 10  # seeds per vmapped call
  # Seeds whose hypergradient is recomputed by plain backprop (method "unroll") as a check.
  c.check_seeds = 2
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.num_train = 500
    c.layer_sizes = (784, 20, 10)
    c.num_steps = 10
    c.batch_size = 50
    c.num_seeds = 4
    c.chunk = 4
    c.check_seeds = 1
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
