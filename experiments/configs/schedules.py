"""Settings of experiments/schedules.py (figures 2-7): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # Data: the bundled 10,000 digits split train/valid/test (the paper: 10k/10k/10k of full
  # MNIST); inputs scaled to [0, 1] and centred with the training split's mean image (the
  # paper's code: the mean of the 60,000 MNIST training digits).
  c.split = (5000, 2500, 2500)
  c.mnist_dir = ""  # a folder with the four MNIST IDX files: full MNIST, split 10k/10k/10k
  c.layer_sizes = (784, 50, 50, 50, 10)
  c.num_steps = 100  # T
  c.batch_size = 200
  # Minibatches drawn with replacement, as the paper's code (randint per step); "epochs":
  # revhyper.datasets.batch_indices, each epoch a fresh permutation.
  c.batches = "with_replacement"
  # Starting hyperparameters (the paper's): alpha = e^-1, gamma = 0.5, init scale e^-3.
  c.log_learning_rate = -1.0
  c.momentum = 0.5
  c.log_init_scale = -3.0
  # Meta-optimisation: the paper's Adam variant (revhyper.meta.paper_adam) with step 0.04 for
  # 50 meta-iterations; "adam" is optax.adam with its defaults.
  c.meta_optimizer = "paper_adam"
  c.meta_step = 0.04
  c.meta_iterations = 50
  # A new seed (initial-weight noise and minibatches) at every meta-iteration, as the paper's
  # code; False trains every meta-iteration on one fixed draw.
  c.reseed = True
  c.seed = 0
  # Held-out evaluation: the learned hyperparameters train this many fresh seeds, never seen
  # while meta-training, and are scored on the test split.
  c.eval_seeds = 20
  c.curve_every = 10  # training loss recorded every this many steps (figure 3, left)
  # The reversible method sizes its bit stack for momenta >= min_momentum; learned momenta are
  # clipped to it (the paper's code needs no bound).
  c.min_momentum = 0.01
  c.method = "reversible"  # or "unroll", "checkpoint": the same hypergradients
  c.checkpoint_every = 5
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.split = (1000, 500, 500)
    c.layer_sizes = (784, 20, 10)
    c.num_steps = 10
    c.batch_size = 50
    c.meta_iterations = 5
    c.curve_every = 2
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
