"""Settings of experiments/chaos.py (figure 11): presets "paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # The authors' code (experiments/Jan_14_learning_rate_wiggliness): the first 1000 training
  # digits as raw x/255 inputs, not centred; one N(0, 1) * e^-2 draw for every parameter
  # (biases too), the same for every learning rate; batches of 250 as consecutive slices,
  # cycled in order; T = 50 steps at gamma = 0.9; the loss on all 1000 digits after training.
  c.num_train = 1000
  c.mnist_dir = ""  # a folder with the four MNIST IDX files: the first digits of full MNIST
  c.centre_inputs = False  # True: subtract the training mean (shifts the picture right)
  c.layer_sizes = (784, 200, 50, 10)
  c.log_init_scale = -2.0
  c.num_steps = 50
  c.batch_size = 250
  c.batches = "consecutive"  # or "shuffled": revhyper.datasets.batch_indices epochs
  c.momentum = 0.9
  c.num_rates = 1000  # grid points of log alpha, as the paper's sweep
  c.log_rate_min = 0.5
  c.log_rate_max = 2.5
  c.seed = 0  # the initial weights (and the minibatch order with batches="shuffled")
  c.chunk = 25  # learning rates per vmapped call: bounds memory, gives progress lines
  # Chaos criteria: g (hypergradient) and d (central difference) disagree when
  # |g - d| > rel_tolerance * max(|g|, |d|, abs_floor); the onset is the smallest log alpha
  # whose window of `window` grid points has a majority disagreeing. Separately, the first
  # log alpha where |g| passes magnitude_threshold.
  c.rel_tolerance = 0.5
  c.abs_floor = 1e-4
  c.window = 9
  c.magnitude_threshold = 1e3
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.num_train = 200
    c.layer_sizes = (784, 30, 10)
    c.num_steps = 20
    c.batch_size = 50
    c.num_rates = 24
    c.chunk = 24
    c.window = 3
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
