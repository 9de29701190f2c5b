"""Small helpers shared by the experiment launchers: configs, seeds, data, results, figures.

Launchers are flat absl scripts configured by an ``ml_collections`` config file per launcher
(``experiments/configs/<launcher>.py``, one preset per argument of its ``get_config``); this
module holds only what several of them do the same way: the config flag, the seed streams of
meta-training and held-out evaluation, the results file (one versioned schema for all
launchers) and a few plots. It imports only revhyper's public API.
"""

import json
import os
import platform
import subprocess
import time

import matplotlib

matplotlib.use("Agg")  # launchers run headless; figures go to files
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import jax.numpy as jnp  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import revhyper  # noqa: E402

RESULTS_SCHEMA = "revhyper.experiments.results/2"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DATA_NOTE = (
    "Ran on the 10,000 bundled MNIST digits (revhyper.datasets.load_mnist()), fewer than the "
    "paper's splits; set config.mnist_dir to a folder with the four MNIST IDX files for the "
    "full data set.")
# Seed streams: meta-training draws its initial noise and minibatches from one stream, held-out
# evaluation from another, so that no evaluation seed was ever seen while meta-training.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def define_config(launcher, preset="paper"):
  """Defines ``--config``, defaulting to ``experiments/configs/<launcher>.py:<preset>``.

  ``--config=experiments/configs/<launcher>.py:quick`` picks another preset, and
  ``--config.<field>=value`` overrides one field.
  """
  return config_flags.DEFINE_config_file(
      "config", os.path.join(CONFIG_DIR, f"{launcher}.py") + f":{preset}",
      f"The {launcher} settings: a config file and preset, e.g. "
      f"experiments/configs/{launcher}.py:quick; override fields with --config.<field>=...",
      lock_config=True)


def define_out_dir(default):
  flags.DEFINE_string("out_dir", default, "Folder for results.json and the figures.")


def meta_training_key(seed):
  """The key whose ``fold_in(key, i)`` seeds meta-iteration i (noise and minibatches)."""
  return jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM)


def held_out_keys(seed, num_seeds):
  """``num_seeds`` keys of fresh initial noise and minibatch order, disjoint from training's."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM), num_seeds)


def mean_sd(values):
  """``{"mean", "sd", "n", "values"}`` of per-seed numbers (sd with ddof=1; 0 for one value)."""
  values = np.asarray(values, np.float64).reshape(-1)
  sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(np.mean(values)), "sd": sd, "n": int(values.size),
          "values": values.tolist()}


def summarise_seeds(per_seed):
  """``mean_sd`` of each entry of a dict of per-seed arrays (e.g. a vmapped evaluation)."""
  return {name: mean_sd(values) for name, values in jax.device_get(per_seed).items()}


def format_mean_sd(stats, scale=1.0, digits=3, unit=""):
  """'0.123 ± 0.004' from a ``mean_sd`` dict (``scale=100, unit="%"`` for error rates)."""
  return (f"{stats['mean'] * scale:.{digits}f}{unit} ± {stats['sd'] * scale:.{digits}f}{unit}")


def load_mnist_splits(mnist_dir, sizes, seed, names, centre=True):
  """Disjoint random splits of MNIST of ``sizes``, scaled to [0, 1] (and centred with the mean
  of the first split unless ``centre`` is False).

  The digits are the bundled 10,000 (``revhyper.datasets.load_mnist()``), or with ``mnist_dir`` the
  full 70,000 of the four IDX files there. ``names`` names the splits in the note, e.g.
  ``("train", "valid")``. Returns ``(data, note)``: data is one ``(x float32 [n, 784],
  y int32 [n])`` per split; the note says which data the run used.
  """
  split = "/".join(str(n) for n in sizes)
  names = "/".join(names)
  if mnist_dir:
    splits = revhyper.datasets.load_mnist_idx(mnist_dir)
    images = np.concatenate([splits["train"][0], splits["test"][0]])
    labels = np.concatenate([splits["train"][1], splits["test"][1]])
    note = f"Ran on full MNIST from {mnist_dir}, split {names} {split}."
  else:
    images, labels = revhyper.datasets.load_mnist()
    note = BUNDLED_DATA_NOTE + f" Split {names} {split}."
  parts = revhyper.datasets.split_data(images, labels, sizes, seed=seed)
  mean = revhyper.datasets.pixel_mean(parts[0][0])
  if not centre:
    mean = np.zeros_like(mean)
    note += " Inputs scaled to [0, 1], not centred."
  data = [(jnp.asarray(revhyper.datasets.preprocess(x, mean)), jnp.asarray(y, jnp.int32))
          for x, y in parts]
  return data, note


def prepare_out_dir(out_dir):
  """Creates ``out_dir`` and returns it."""
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "tolist"):  # numpy and jax arrays, numpy scalars
    return value.tolist()
  return value


def provenance():
  """What produced a result: the commit (and whether the tree had changes), JAX, the backend."""
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True,
                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
      return None
  status = git("status", "--porcelain", "--untracked-files=no")
  device = jax.devices()[0]
  return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(status),
          "jax_version": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)),
          "python": platform.python_version(), "numpy": np.__version__}


def write_results(out_dir, experiment, config, results, departures=(), name="results.json"):
  """Writes one launcher's ``results.json`` atomically, in the schema all launchers share.

  Top level: ``schema``, ``experiment`` (which figure), ``provenance`` (commit, JAX version,
  backend, device), ``config`` (the resolved config, every field), ``departures`` (how this
  run differs from the paper's code, one sentence each), ``written_at``, then the launcher's
  own ``results`` (dicts, lists, arrays, scalars). Returns the path.
  """
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  record = {"schema": RESULTS_SCHEMA, "experiment": experiment, "provenance": provenance(),
            "config": config, "departures": list(departures)}
  for key, value in results.items():
    if key in record or key == "written_at":
      raise ValueError(f"results may not redefine the shared field {key!r}")
    record[key] = value
  return save_results(out_dir, record, name)


def save_results(out_dir, results, name="results.json"):
  """Writes ``results`` (dicts, lists, arrays, scalars) as JSON atomically; returns the path."""
  path = os.path.join(out_dir, name)
  record = dict(_jsonable(results), written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, allow_nan=True)
  os.replace(tmp, path)
  return path


def save_figure(fig, out_dir, name):
  """Saves a matplotlib figure as PNG under ``out_dir`` and closes it; returns the path."""
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def image_grid(images, rows, cols, pad=1):
  """Tiles ``images`` [n, h, w] into one [rows*(h+pad), cols*(w+pad)] array (NaN padding)."""
  images = np.asarray(images, np.float64)
  n, h, w = images.shape
  grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
  for i in range(min(n, rows * cols)):
    r, c = divmod(i, cols)
    grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[i]
  return grid


def meta_learning_curve(history, values, final, label, ylabel="loss after training"):
  """Starts a meta-learning curve: ``values`` (one per entry of ``history``, before that
  meta-iteration's update), then ``final`` (after the last update), against the iteration.

  Returns ``(fig, ax)`` with the axes labelled; the caller adds its own reference lines, then
  the legend.
  """
  it = [r["iteration"] for r in history] + [len(history)]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(it, list(values) + [final], "o-", ms=3, label=label)
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel(ylabel)
  ax.set_title("Meta-learning curve")
  ax.grid(alpha=0.3)
  return fig, ax


def band(ax, x, per_seed, label, colour, ls="-"):
  """Plots the mean over seeds (rows of ``per_seed``) and a shaded band of one sd around it."""
  per_seed = np.asarray(per_seed, np.float64)
  mean = per_seed.mean(axis=0)
  sd = per_seed.std(axis=0, ddof=1) if per_seed.shape[0] > 1 else np.zeros_like(mean)
  ax.plot(x, mean, ls, color=colour, label=f"{label} (mean ± sd, {per_seed.shape[0]} seeds)")
  ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.25, lw=0)


def before_after_bars(ax, names, before, after, ylabel, scale=1.0):
  """Bars of the held-out mean before and after meta-learning, with one-sd error bars.

  ``before`` and ``after`` map each name to a ``mean_sd`` dict.
  """
  x = np.arange(len(names))
  for offset, (label, stats, colour) in ((-0.2, ("before", before, "0.6")),
                                         (0.2, ("after", after, "C0"))):
    ax.bar(x + offset, [stats[n]["mean"] * scale for n in names], 0.4,
           yerr=[stats[n]["sd"] * scale for n in names], color=colour, capsize=3, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels(names)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)


def memory_limit_bytes(limit_gb):
  """The memory a benchmark may plan for: ``limit_gb`` if given, else 90% of the device's
  limit, or on a host without one 70% of physical memory (at most 16 GB)."""
  if limit_gb is not None:
    return int(limit_gb * 1e9)
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    # Headroom for the allocator's fragmentation and for other live buffers.
    return int(0.9 * stats["bytes_limit"])
  physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(min(16e9, 0.7 * physical))


# ------------------------------------------------------------------------------------------------
# Timing side by side (the benchmarks): compile with XLA's memory plan, leave out what would not
# fit, then time round-robin, so that background load falls on every method alike.


def format_bytes(n, digits=1):
  return f"{n / 1e9:.{digits}f} GB" if n >= 1e9 else f"{n / 1e6:.{digits}f} MB"


def compile_with_plan(function, args, compiler_options=None):
  """Traces and compiles ``function`` (a jitted function) at ``args``; returns the compiled
  function and a record of its trace and compile times and XLA's memory plan."""
  start = time.perf_counter()
  lowered = function.lower(*args)
  traced = time.perf_counter()
  compiled = lowered.compile(compiler_options=compiler_options)
  done = time.perf_counter()
  analysis = compiled.memory_analysis()
  memory = {
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "argument_bytes": int(analysis.argument_size_in_bytes),
      "output_bytes": int(analysis.output_size_in_bytes),
      "alias_bytes": int(analysis.alias_size_in_bytes),
      "generated_code_bytes": int(analysis.generated_code_size_in_bytes),
  }
  memory["planned_bytes"] = (memory["temp_bytes"] + memory["argument_bytes"]
                             + memory["output_bytes"] - memory["alias_bytes"])
  return compiled, {"trace_s": traced - start, "compile_s": done - traced, "memory": memory}


def timed_call(compiled, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start, out


def drop_unfitting(compiled, records, limit, label, progress, digits=1):
  """Removes from ``compiled`` every function whose memory plan exceeds ``limit`` bytes,
  recording ``fits`` (and ``not_run``, why) in its record."""
  for name in list(compiled):
    planned = records[name]["memory"]["planned_bytes"]
    records[name]["fits"] = planned <= limit
    if not records[name]["fits"]:
      del compiled[name]  # reported from its memory plan alone
      records[name]["not_run"] = (f"needs {format_bytes(planned, digits)} by XLA's memory "
                                  f"plan, over the {format_bytes(limit, digits)} limit")
      progress(f"{label} {name}: {records[name]['not_run']}")


def time_round_robin(compiled, records, args, repeats, num_steps, label, progress):
  """Warms every function up, then times ``repeats`` rounds of calls alternating between them.

  Records per function ``warmup_s``, ``times_s``, their median ``time_s`` and minimum
  ``time_min_s``, and ``ms_per_step``; a function that fails is recorded (``error``) and left
  out. Returns ``(outputs of the warm-up calls, load average before and after the rounds)``.
  """
  outputs = {}
  for name in list(compiled):
    progress(f"{label} {name}: warm-up")
    try:
      records[name]["warmup_s"], outputs[name] = timed_call(compiled[name], *args)
    except Exception as e:  # noqa: BLE001  (a failing method is reported, the rest still run)
      records[name]["error"] = f"{type(e).__name__}: {e}"[:2000]
      del compiled[name]
  times = {name: [] for name in compiled}
  progress(f"{label}: {repeats} timed rounds over {len(compiled)} methods")
  load_before = os.getloadavg()[0]
  for _ in range(repeats):
    for name in compiled:
      times[name].append(timed_call(compiled[name], *args)[0])
  load = [load_before, os.getloadavg()[0]]
  for name, ts in times.items():
    records[name]["times_s"] = ts
    records[name]["time_s"] = float(np.median(ts)) if ts else records[name]["warmup_s"]
    records[name]["time_min_s"] = float(np.min(ts)) if ts else records[name]["warmup_s"]
    records[name]["ms_per_step"] = 1e3 * records[name]["time_s"] / num_steps
  return outputs, load
