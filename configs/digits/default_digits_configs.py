"""DIGITS configs: scikit-learn's 8x8 handwritten digits (17 grey levels) with small models on CPU.

`digits(config)` scales one of Score SDE's CIFAR-10 configs (its SDE, network family, time embedding and
sampler stay as there) down to the digits: the data, a small network, a schedule that pretrains in minutes on
two CPU cores, and an evaluation of the whole test split (360 images, 17-level bits/dim:
`likelihood.discrete_offset`). Configs: `ve_ncsnpp_continuous.py`, `vp_ddpmpp_continuous.py`, and their
FP-Diffusion fine-tuning variants `fp_ve_ncsnpp_continuous.py`, `fp_vp_ddpmpp_continuous.py`
(docs/study.md (DIGITS section)).
"""

# Pretraining steps (DSM), and the checkpoint written at the end of them.
PRETRAINING_STEPS = 4000


def digits(config):
  """Sets the DIGITS data, network size, schedule and evaluation on a Score SDE CIFAR-10 config, in place.

  The network keeps the base's design (NCSN++: FIR up/down-sampling in BigGAN residual blocks, input skips,
  Fourier embedding; DDPM++: the same blocks without FIR, positional embedding) at 8x8 -> 4x4 with attention at
  4x4 and 190k parameters.

  Returns:
    `config`, for chaining.
  """
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
  model.nf = 16
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.dropout = 0.
  # Score SDE's rule for sigma_max (Song & Ermon 2020, technique 1): about the largest distance between two
  # training images, 4.8 for the digits in [0, 1]^64.
  model.sigma_max = 5
  # Score SDE's 1000 noise levels cost 1000-2000 network evaluations per sample; 200 suffice for 8x8 digits.
  model.num_scales = 200
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
  evaluate.fp_residual_num_times = 10  # as configs/fp/fp_finetuning.fine_tune
  evaluate.fp_residual_num_batches = 1
  return config
