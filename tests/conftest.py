"""Test set-up: the repository root is importable (modules live at top level, as in Score SDE)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Tests run on 2 CPU cores; more threads only add contention.
import torch  # noqa: E402

torch.set_num_threads(2)


def _drop_tensorflow_shutdown_noise(default_hook):
  """An unraisable hook that drops one known message and passes the rest to `default_hook`: at interpreter
  shutdown TF 2.15's `AtomicFunction.__del__` (of traced functions still alive, e.g. a loaded SavedModel's) meets
  module globals already set to None and prints an ignored TypeError each: a screenful after the test summary that
  pushed a CI failure's report out of the log's tail."""
  def hook(unraisable):
    name = getattr(unraisable.object, '__qualname__', '')
    if name == 'AtomicFunction.__del__' and isinstance(unraisable.exc_value, TypeError):
      return
    default_hook(unraisable)
  return hook


sys.unraisablehook = _drop_tensorflow_shutdown_noise(sys.unraisablehook)
