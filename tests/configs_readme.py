"""Tiny stand-ins for the configs the README's commands use, so that tests/test_readme.py can run them.

`get_config()` is to `tests/configs_tiny.py` (VE NCSN++, on a one-resolution U-Net) what the CIFAR-10 configs
of `configs/fp/` are to Score SDE's: the same `fp_finetuning.fine_tune` applied to a base whose
`training.n_iters` is `PRETRAIN_STEPS`, then shrunk again (batch, FP batch share, evaluation sizes) to run on a
CPU in seconds. Its fine-tuned checkpoints are `checkpoint_{PRETRAIN_STEPS + 1}..{n_iters}` (a snapshot every
step), as the CIFAR-10 recipe's are 261..280. `get_config('pretrain')` is the base, the config of the stand-in
of a released Score SDE checkpoint (at step `PRETRAIN_STEPS`), and of the README's DSM training on own data.
"""

import utils
from configs.fp.fp_finetuning import fine_tune
from tests import configs_tiny

PRETRAIN_STEPS = 2
FINE_TUNING_STEPS = 1


def _pretrain_config():
  config = configs_tiny.get_config()
  config.training.n_iters = PRETRAIN_STEPS
  config.training.snapshot_freq = 1
  config.training.snapshot_sampling = False
  config.training.alpha = config.training.beta = 0.  # Score SDE's checkpoints are plain DSM
  # One resolution: an NCSN++ forward pass 8 times cheaper on a CPU than configs_tiny's two (the README's
  # evaluations solve the probability-flow ODE, tens of passes).
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = (8,)
  return config


def get_config(kind='fp'):
  """kind: 'fp' (the fine-tuning config) or 'pretrain' (the config of the "released" checkpoint)."""
  utils.check_choice('kind', kind, ('fp', 'pretrain'))
  if kind == 'pretrain':
    return _pretrain_config()
  config = fine_tune(_pretrain_config())
  training = config.training
  # References in fine_tune: the evaluated range follows, to PRETRAIN_STEPS + 1..n_iters.
  training.n_iters = PRETRAIN_STEPS + FINE_TUNING_STEPS
  training.snapshot_freq = 1
  training.batch_size = 4
  training.alpha = 0.01  # near-random weights: fine_tune's 0.15 can overflow
  training.beta = 0.001
  training.fp_batch_fraction = 0.25  # as configs_tiny: the FP term's double backward dominates on a CPU
  training.log_freq = 1
  training.eval_freq = 100
  config.eval.fp_residual_num_times = 1
  # A step of Score SDE's learning rate moves the output layer (initialized to zero) enough to make the
  # probability-flow ODE of bits/dim stiff near t = eps (hundreds of network passes); a small step keeps it as
  # cheap to solve as the baseline's. The recipe's plumbing is under test, not what one step learns.
  config.optim.lr = 1e-6
  return config
