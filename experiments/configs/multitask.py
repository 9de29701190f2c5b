"""Settings of experiments/multitask.py (figure 10): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # The authors' code (experiments/Feb_4_augmented_omniglot/2_rotated_90): 10 tasks (5
  # alphabets and their 90-degree rotations), one tanh net per task whose layer-l weights are
  # T_l @ z_l, a learned 10x10 mixing of free weights z (L2 exp(-4) on z); T = 50 full-batch
  # steps, alpha = 1, gamma = 0.9, z0 = e^-2 N(0, 1) drawn anew per meta-iteration; each
  # meta-iteration redraws the train/valid split of the training pool; meta-loss: validation
  # NLL averaged over tasks; plain gradient descent with step 0.2 for 20 meta-iterations,
  # starting at T_l = 0.5 I + 0.5 / 10 (all layers). Baselines: separate (T = I) and tied
  # (the first layer shared: T_1 = 1/10 everywhere, the others I).
  c.omniglot_dir = ""  # the Omniglot archives; empty: the MNIST stand-in
  c.omniglot_archives = ("images_background", "images_evaluation")
  c.alphabets = ()  # default: the first 5 alphabets of the archives read
  # Per character (Omniglot) or per class and task (MNIST stand-in): training pool drawings
  # split train/valid anew each meta-iteration, and test drawings never used in meta-training.
  c.omniglot_split = (10, 2, 3)  # the authors': 12 for training (10 + 2 validation), 3 test
  c.mnist_split = (25, 5, 50)
  c.hidden = (100, 50)  # the MNIST stand-in's nets; with Omniglot, the paper's (400, 200)
  c.num_steps = 50
  c.learning_rate = 1.0
  c.momentum = 0.9
  c.log_init_scale = -2.0
  c.log_l2 = -4.0  # L2 on the free weights z, fixed in the learned run (the authors')
  c.initial_sharing = 0.5  # T_l = (1 - s) I + s / K at the start of meta-learning
  # The authors' step is 0.2 on Omniglot (--config.meta_step=0.2 with omniglot_dir). On the
  # MNIST stand-in the hypergradient's norm is 0.05-0.15 over the 300 entries, and 0.2 leaves
  # the mixing where it began; 5 moves it (20 diverged within a few steps in the quick preset).
  c.meta_step = 5.0
  c.meta_iterations = 20
  c.seed = 0
  # Baselines are tuned: their L2 is the best of this grid by validation NLL.
  c.baseline_log_l2_grid = (-8.0, -6.0, -4.0, -2.0)
  # Held-out evaluation: fresh initial draws (and train/valid redraws for the validation
  # score), mean ± sd over this many seeds.
  c.eval_seeds = 20
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.mnist_split = (8, 4, 10)
    c.hidden = (16, 8)
    c.num_steps = 10
    c.meta_iterations = 6
    c.baseline_log_l2_grid = (-6.0, -4.0)
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
