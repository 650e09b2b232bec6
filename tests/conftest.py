"""Test set-up: the repository root is importable (modules live at top level, as in Score SDE)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Tests run on 2 CPU cores; more threads only add contention.
import torch  # noqa: E402

torch.set_num_threads(2)
