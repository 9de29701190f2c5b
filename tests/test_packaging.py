"""The built wheel works on its own: installed outside the checkout, it trains, differentiates
and reads the bundled digits from its package data."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What a source distribution holds: the package and its metadata, nothing else of the checkout.
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "revhyper")

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, revhyper
    images, labels = revhyper.datasets.load_mnist()
    x = jnp.asarray(images[:64], jnp.float32) / 255.0
    y = jax.nn.one_hot(labels[:64], 10)

    def loss(w, l2, t):
      logits = x @ w
      return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=1)) + l2 * jnp.sum(w ** 2)

    def meta(l2, method):
      out = revhyper.sgd(loss, jnp.zeros((784, 10)), l2, num_steps=30, learning_rate=0.5,
                         momentum=0.5, method=method)
      return loss(out.params, 0.0, 0)

    checked = revhyper.Reversible(check_reversal=True)
    grads = [float(jax.jit(jax.grad(meta), static_argnums=1)(0.01, m))
             for m in (checked, "unroll")]
    print(json.dumps({"module": revhyper.__file__, "digits": list(images.shape),
                      "hypergradients": grads}))
""")


@pytest.mark.slow
def test_the_wheel_installed_outside_the_checkout_computes_a_hypergradient(tmp_path):
  # Built from a copy, so that the build's own folders never land in the checkout.
  source = tmp_path / "source"
  source.mkdir()
  for name in SOURCES:
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, source / name,
                      ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(ROOT / name, source / name)
  wheels = tmp_path / "wheels"
  # pip builds in an isolated environment with the build requirements of pyproject.toml,
  # fetched from the package index.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                  str(source)], check=True, capture_output=True, text=True)
  (wheel,) = wheels.glob("revhyper-*.whl")
  assert "revhyper/data_files/mnist10k.npz" in zipfile.ZipFile(wheel).namelist()
  # Installed into a folder of its own; this interpreter supplies the dependencies.
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                  "--target", str(target), str(wheel)], check=True, capture_output=True,
                 text=True)
  run_dir = tmp_path / "elsewhere"
  run_dir.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=run_dir, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert pathlib.Path(result["module"]).is_relative_to(target)
  assert result["digits"] == [10000, 784]
  reversible, unroll = result["hypergradients"]
  assert reversible == pytest.approx(unroll, rel=1e-4)
