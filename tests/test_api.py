"""The public namespace: the core at the top level, everything else in named submodules."""

import importlib

import revhyper

CORE = {"AdamResult", "Checkpoint", "ReversalError", "Reversible", "RoundTrip", "SGDResult",
        "RunningAverage", "Stats", "TrainResult", "Unroll", "adam", "round_trip", "sgd", "train"}
SUBMODULES = {"datasets", "hyper", "meta", "models", "optim"}


def test_top_level_is_the_core_and_its_submodules():
  assert set(revhyper.__all__) == CORE
  assert set(dir(revhyper)) == CORE | SUBMODULES | {"__version__"}


def test_every_exported_name_exists_and_is_documented():
  for module_name in ["revhyper"] + [f"revhyper.{m}" for m in sorted(SUBMODULES)]:
    module = importlib.import_module(module_name)
    assert module.__doc__, module_name
    for name in module.__all__:
      obj = getattr(module, name)
      assert obj.__doc__, f"{module_name}.{name} has no docstring"


def test_submodules_do_not_overlap():
  seen = {}
  for m in sorted(SUBMODULES):
    for name in importlib.import_module(f"revhyper.{m}").__all__:
      assert name not in seen, f"{name} in both {seen.get(name)} and {m}"
      seen[name] = m
