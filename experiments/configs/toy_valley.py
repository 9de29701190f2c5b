"""Settings of experiments/toy_valley.py (figure 1): presets "paper" and "quick" (the same)."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # The authors' code (experiments/Jan_25_Figure_1/2): the loss
  # 800 * sigmoid(R(w) / 500), R(w) = 100 (w2 - w1^2)^2 + (1 - w1)^2 + 200 w1, from
  # w0 = (1.4, 3.9) with zero velocity; T = 50 steps, one log learning rate and one logit
  # momentum per step starting at alpha = e^-4.5, gamma = 0.99; 3 meta-iterations of momentum
  # gradient descent (velocity = 0.9 v - 0.1 g, step 0.01) on the loss after training.
  c.start = (1.4, 3.9)
  c.num_steps = 50
  c.log_learning_rate = -4.5
  c.momentum = 0.99
  c.meta_iterations = 3
  c.meta_step = 0.01
  c.meta_momentum = 0.9
  # The reversible method sizes its bit stack for momenta >= min_momentum (learned momenta are
  # clipped to it; the paper's code needs no bound).
  c.min_momentum = 0.01
  if preset not in ("paper", "quick"):  # the paper's run already takes seconds
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
