"""Run by tests/test_distributed.py under torchrun: trains the tiny 2-D config of tests/configs_tiny.py (with
overrides), then saves this rank's parameters to `<out>/rank{r}.pt`, outside the workdir, so that the test can
compare ranks and check that only rank 0 wrote into the workdir.

  python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_worker.py W OUT JSON_OVERRIDES
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import distributed  # noqa: E402
import run_lib  # noqa: E402
from tests import configs_tiny  # noqa: E402


def config_with(overrides):
  """The tiny toy config with dotted-name overrides, e.g. {'training.alpha': 0.5}."""
  config = configs_tiny.get_toy_config()
  for name, value in overrides.items():
    section, field = name.split('.')
    setattr(getattr(config, section), field, value)
  return config


def main():
  workdir, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  config = config_with(overrides)
  ctx = distributed.init_from_env(config.device)
  runs = []
  setup = run_lib.setup_training
  # Keep the run that train() builds, to read its final parameters.
  run_lib.setup_training = lambda *args, **kwargs: runs.append(setup(*args, **kwargs)) or runs[-1]
  try:
    run_lib.train(config, workdir)
    state = runs[0].state
    os.makedirs(out, exist_ok=True)
    torch.save({'params': [p.detach().clone() for p in state['model'].parameters()], 'step': int(state['step'])},
               os.path.join(out, f'rank{ctx.rank}.pt'))
  finally:
    distributed.shutdown()


if __name__ == '__main__':
  main()
