"""Settings of experiments/l2_per_weight.py (figure 8): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # The authors' code (experiments/Jan_21_nn_ard/2): logistic regression 784-10 trained for
  # T = 50 steps of batch 200 (consecutive slices in order), alpha = 1, gamma = 0.9, from one
  # fixed draw w0 = e^-4 N(0, 1); one L2 penalty per weight, penalty = exp(h), starting at
  # h = log(0.01) + 1 ~ -3.6; meta-loss: validation NLL + 0.01 * ||exp(h)||^2; plain gradient
  # descent with step 1000 for 50 meta-iterations; 10k train / 10k valid / 1k test.
  c.split = (5000, 4000, 1000)  # train/valid/test of the bundled digits
  c.mnist_dir = ""
  c.num_steps = 50
  c.batch_size = 200
  c.learning_rate = 1.0
  c.momentum = 0.9
  c.log_init_scale = -4.0
  c.initial_log_penalty = -3.6052  # log(0.01) + 1, the authors' start
  c.meta_l2 = 0.01  # weight of ||exp(h)||^2 in the meta-loss (a later version of the script: 0.1)
  c.meta_step = 1000.0
  c.meta_iterations = 50
  c.seed = 0
  # Held-out evaluation: fresh initial draws and minibatch orders, scored on the test split.
  c.eval_seeds = 20
  # Baseline: the best single penalty shared by all weights, by validation loss.
  c.uniform_grid = (-10.0, -9.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0)
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.split = (1000, 500, 500)
    c.num_steps = 10
    c.batch_size = 100
    c.meta_iterations = 4
    c.uniform_grid = (-8.0, -5.0, -2.0)
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
