"""Settings of experiments/hpo_benchmark.py (hyperparameter optimisers at equal compute): presets
"paper" and "quick"."""

from ml_collections import config_dict


def get_config(preset="paper"):
  c = config_dict.ConfigDict()
  # Data: the bundled 10,000 digits split train/valid/test; the search only ever sees train and
  # valid, the scores only test.
  c.split = (5000, 2500, 2500)
  c.mnist_dir = ""  # a folder with the four MNIST IDX files: full MNIST instead
  c.seed = 0  # of the data split, the search's seeds and the samplers
  # Tasks, each "model:optimizer:steps": model mlp (c.layer_sizes, tanh) or convnet
  # (c.conv_channels, 3x3 stride-2 tanh convolutions, then a linear layer; no BatchNorm);
  # optimizer sgd (momentum SGD) or adamw.
  c.tasks = ("mlp:sgd:100", "mlp:adamw:100", "convnet:sgd:100", "mlp:sgd:1000")
  # The contenders to run, by name (empty: every one), e.g. --config.contenders="('tpe_constant',
  # 'hypergradient')"; the verdict needs a hypergradient contender and another.
  c.contenders = ()
  c.layer_sizes = (784, 50, 50, 50, 10)
  c.conv_channels = (8, 16)
  c.batch_size = 200
  # Compute: every contender gets this many training-run equivalents per task; the held-out
  # curve is scored when each contender has spent these fractions of it.
  c.budget_runs = 150
  c.checkpoints = (0.25, 0.5, 1.0)
  # The search space (random search, TPE; the other contenders start at its defaults): log
  # uniform learning rate per optimizer, uniform momentum (SGD) or b1 (AdamW), log uniform
  # weight decay and init scale (a multiple of 1 / sqrt(fan in)).
  c.sgd_learning_rate = (0.01, 3.0)
  c.adamw_learning_rate = (1e-4, 0.1)
  c.momentum = (0.5, 0.99)
  c.weight_decay = (1e-6, 1e-2)
  c.init_scale = (0.1, 3.0)
  c.warmup_fraction = 0.1  # of the warmup-cosine family: linear warmup, then cosine to zero
  # Where the gradient-based contenders start: SGD lr 0.1, AdamW lr 1e-3 (optax's default),
  # momentum / b1 0.9, weight decay 1e-4, init scale 1.
  c.default_sgd_learning_rate = 0.1
  c.default_adamw_learning_rate = 1e-3
  c.default_momentum = 0.9
  c.default_weight_decay = 1e-4
  c.default_init_scale = 1.0
  c.search_seeds = 1  # training runs per random-search or TPE trial
  c.tpe_startup_trials = 8
  # Hypergradient descent (online, greedy, one step): the rates of its log learning rate,
  # tried in turn; each pass is one training run with hypergradient updates.
  c.hd_betas = (0.003, 0.01, 0.03, 0.1)
  # Truncated hypergradients: windows of this many steps (dividing every task's T).
  c.window = 10
  # Hypergradients (full horizon and truncated): optax.adam with this step, after
  # revhyper.meta.clip_hypergradient at this norm.
  c.meta_step = 0.05
  c.max_hypergrad_norm = 10.0
  c.smooth_meta_step = 0.1  # the smooth family's few values move further per meta-step
  # The meta-step decays along a cosine to 0 over the meta-steps the budget affords (False: a
  # fixed step, which near the optimum follows the hypergradient's noise across seeds).
  c.meta_step_decay = True
  # Each hypergradient comes with the validation loss of its point: the gradient-based
  # contenders offer the best point so far by that loss (False: the point just stepped to).
  c.keep_best = True
  # The smooth family: warmup-cosine with learned peak, momentum, weight decay and init scale,
  # times exp of this many cosine basis functions of t per weight type; its hypergradient is
  # averaged over avg_seeds seeds per meta-iteration.
  c.num_basis = 3
  c.avg_seeds = 2
  # tpe_then_hypergradient: this fraction of the budget on TPE, the rest on hypergradients.
  c.warm_start_fraction = 0.25
  c.min_decay = 0.5  # lower bound on momentum, b1 and 1 - lr * wd (sizes the bit stack)
  # Scoring: what each contender found trains this many fresh seeds (never used in the search)
  # and is measured on the test split.
  c.eval_seeds = 20
  # Timed calls per measured cost, alternating between the units (after one that compiles
  # each): the fastest counts.
  c.timing_repeats = 5
  if preset == "quick":  # a smoke run: the launcher's docstring states its CPU time
    c.split = (600, 300, 300)
    c.tasks = ("mlp:adamw:10", "convnet:sgd:10")  # both optimizers, both models
    c.layer_sizes = (784, 16, 10)
    c.conv_channels = (4,)
    c.batch_size = 50
    c.budget_runs = 4
    c.checkpoints = (0.5, 1.0)
    c.hd_betas = (0.03,)
    c.window = 5
    c.tpe_startup_trials = 3
    c.avg_seeds = 1  # shares one compiled hypergradient with the free schedules
    c.eval_seeds = 2
    c.timing_repeats = 1
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use 'paper' or 'quick'")
  return c
