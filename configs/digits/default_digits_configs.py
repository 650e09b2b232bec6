"""Defaults of the DIGITS configs: scikit-learn's 8x8 handwritten digits (17 grey levels), small models on CPU.

Score SDE's CIFAR-10 defaults (so every field exists and is validated as there) with the data, the schedule and
the evaluation scaled down so that a model pretrains in minutes on two CPU cores and evaluates bits/dim on the
whole test split (360 images, 17-level bits/dim: `likelihood.discrete_offset`). Overrides:
`ve_ncsnpp_continuous.py`, `vp_ddpmpp_continuous.py`, and their FP-Diffusion fine-tuning variants
`fp_ve_ncsnpp_continuous.py`, `fp_vp_ddpmpp_continuous.py` (docs/study_digits.md).
"""

from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults

# Pretraining steps (DSM), and the checkpoint written at the end of them.
PRETRAINING_STEPS = 4000


def get_default_configs():
  """Returns the DIGITS defaults."""
  config = get_cifar10_defaults()
  training = config.training
  training.batch_size = 64
  training.n_iters = PRETRAINING_STEPS
  # One checkpoint at the end of pretraining (checkpoint_1), which fine-tuning resumes from.
  training.snapshot_freq = PRETRAINING_STEPS
  training.snapshot_freq_for_preemption = 500
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_sampling = False

  data = config.data
  data.dataset = 'DIGITS'
  data.image_size = 8
  data.num_channels = 1
  # A mirrored digit is another image (a mirrored 3 is no digit): no flips.
  data.random_flip = False

  model = config.model
  # Score SDE's rule for sigma_max (Song & Ermon 2020, technique 1): about the largest distance between two
  # training images, 4.8 for the digits in [0, 1]^64.
  model.sigma_max = 5
  model.dropout = 0.
  # EMA over about 50 steps: the 200 fine-tuning steps then leave 0.98^200 = 2% of the pretrained weights in
  # the evaluated model (a checkpoint keeps its EMA decay, so fine-tuning cannot change it).
  model.ema_rate = 0.98

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 200

  evaluate = config.eval
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 1
  # The whole test split in one batch (one ODE solve for bits/dim).
  evaluate.batch_size = 360
  evaluate.enable_loss = True
  evaluate.enable_bpd = True
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_repeats = 1
  evaluate.enable_sampling = True
  evaluate.num_samples = 360
  evaluate.enable_fp_residual = True
  evaluate.fp_residual_num_times = 5
  evaluate.fp_residual_num_batches = 1
  return config


def small_ncsnpp(config):
  """A small NCSN++ (8x8 -> 4x4, 190k parameters) with Score SDE's NCSN++ choices: FIR up/down-sampling in BigGAN
  residual blocks, attention at 4x4, Fourier time embedding. Sets `config.model` in place and returns `config`."""
  model = config.model
  model.name = 'ncsnpp'
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 16
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'none'
  model.progressive_input = 'residual'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.fourier_scale = 16
  model.conv_size = 3
  return config
