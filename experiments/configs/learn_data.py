"""Settings of experiments/learn_data.py (figure 9): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # The authors' code (experiments/Jan_19_optimize_data/9_color_bar): ten learned training
  # images (one per class, starting at 0.01 N(0, 1) in the centred input space) and a log L2
  # penalty (starting at log 0.01); logistic regression trained for T = 20 full-batch steps
  # (batch 10), alpha = 1, gamma = 0.9, from one fixed draw w0 = e^-4 N(0, 1); meta-objective:
  # the loss on 10,000 real validation digits; plain gradient descent with step 1, 40
  # iterations; 1000 test digits.
  c.split = (9000, 1000)  # valid/test of the bundled digits
  c.mnist_dir = ""
  c.num_steps = 20
  c.learning_rate = 1.0
  c.momentum = 0.9
  c.log_init_scale = -4.0
  c.initial_image_scale = 0.01
  c.initial_log_l2 = -4.6052  # log 0.01
  c.meta_step = 1.0
  c.meta_iterations = 40
  c.seed = 0
  c.eval_seeds = 20  # held-out initial draws w0
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.split = (1000, 500)
    c.num_steps = 10
    c.meta_iterations = 5
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
