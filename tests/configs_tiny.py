"""Tiny configs for the end-to-end tests of main.py / run_lib.py (CPU, seconds per run).

`get_config()` is Score SDE's NCSN++ VE continuous config shrunk to 8x8x3 images of the NPZ dataset (set
`data.path`), with the FP regularizer on, a few-step PC sampler and a few-step schedule. It is also a
`--config` file for main.py: `python main.py --config tests/configs_tiny.py --config.data.path=...`.
`get_toy_config()` is the 2-D demo's VE config shrunk the same way; `get_toy_fp_config()` is it with the
settings the trainer tests compare steps with.
"""

import ml_collections

import utils
from configs.toy import ve_dsm
from configs.ve import cifar10_ncsnpp_continuous


def tiny_schedule(config):
  """Shrinks `config`'s training to a few CPU steps, with FP-Diffusion on, checkpoints and snapshots; returns it."""
  training = config.training
  training.batch_size = 4
  training.n_iters = 4
  training.snapshot_freq = 2
  training.snapshot_freq_for_preemption = 1
  training.log_freq = 1
  training.eval_freq = 2
  training.snapshot_sampling = True
  # FP-Diffusion on, with the paper's estimator; a small alpha so random weights give a finite loss.
  training.alpha = 0.01
  training.beta = 0.001
  training.fp_batch_fraction = 0.25  # the FP term on 1 of the 4 samples: its double backward dominates on CPU
  config.model.num_scales = 4
  config.model.ema_rate = 0.9
  config.optim.warmup = 1
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 2
  config.eval.batch_size = 4
  config.eval.num_samples = 4
  config.eval.enable_loss = True
  config.eval.enable_bpd = True
  config.eval.enable_sampling = False
  config.eval.bpd_num_repeats = 1
  config.eval.enable_fp_residual = True
  config.eval.fp_residual_num_times = 2
  config.eval.fp_residual_num_batches = 1
  return config


def get_config(kind='image'):
  """NCSN++ (nf 8, ch_mult (1, 2)), VE continuous, 8x8x3 NPZ images; `kind='toy'`: `get_toy_config()` (for
  main.py: `--config=tests/configs_tiny.py:toy`)."""
  if kind == 'toy':
    return get_toy_config()
  utils.check_choice('kind', kind, ('image', 'toy'))
  config = tiny_schedule(cifar10_ncsnpp_continuous.get_config())
  config.sampling.corrector = 'none'
  data = config.data
  data.dataset = 'NPZ'
  data.path = ''
  data.image_size = 8
  data.num_channels = 3
  model = config.model
  model.nf = 8
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.sigma_max = 10
  return config


def get_toy_config():
  """The 2-D demo's MLP on checkerboard data, VE continuous, with a small network and evaluation sets."""
  config = tiny_schedule(ve_dsm.get_config())
  config.sampling.method = 'pc'
  config.model.nf = 16
  config.model.num_layers = 1
  config.data.toy_eval_batches = 2
  config.eval.bpd_num_repeats = 2
  config.eval.enable_sampling = True
  config.eval.num_samples = 6  # two rounds of 4, truncated to 6
  # The demo's defaults changed for its converged baseline (issue 13); the tiny runs keep their earlier setting.
  config.data.toy = 'checkerboard'
  config.optim.lr = 1e-3
  config.optim.schedule = 'constant'
  config.eval.enable_conservativity = False
  return config


def get_toy_fp_config(**training):
  """`get_toy_config()` at batch 8 with the FP vector term on (alpha 0.5, Hutchinson probes, the exact d_t s),
  no dropout; `training` overrides `config.training` fields, with values of any type (a plain dict round trip:
  the tests of bad values)."""
  config = get_toy_config()
  config.training.batch_size = 8
  config.training.alpha = 0.5
  config.training.beta = 0.
  config.training.fp_divergence = 'hutchinson'
  config.training.fp_batch_fraction = 1.
  # The exact d_t s: the finite difference divides by steps of 1e-3, which turns float32 rounding into
  # relative differences of 1e-4 between two summation orders, too coarse to compare updates.
  config.training.fp_time_derivative = 'forward_ad'
  config.model.dropout = 0.
  fields = config.training.to_dict()
  fields.update(training)
  config.training = ml_collections.ConfigDict(fields)
  return config
