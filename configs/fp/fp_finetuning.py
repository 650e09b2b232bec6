"""FP-Diffusion's fine-tuning setting, applied to a Score SDE config (shared by the configs in this folder).

FP-Diffusion (Lai et al., ICML 2023) fine-tunes a DSM-trained Score SDE checkpoint with the score-FPE
regularizer. As in Score SDE, training resumes from `<workdir>/checkpoints-meta/checkpoint.pth`: put the
pre-trained checkpoint there. Fine-tuning then runs for `FINE_TUNING_STEPS` steps past Score SDE's
`training.n_iters`. See docs/score_fpe.md.
"""

FINE_TUNING_STEPS = 100000
SNAPSHOT_FREQ = 5000


def fine_tune(config):
  """Sets the paper's FP-Diffusion values (from the released default config) on `config`, in place.

  Args:
    config: a Score SDE config (continuous-time training).

  Returns:
    `config`, for chaining.
  """
  training = config.training
  pretrained_iters = training.n_iters
  # The released FP-Diffusion default config: batch 48, likelihood weighting, both terms, lambda = g^2.
  training.batch_size = 48
  training.likelihood_weighting = True
  training.scalar_fp = 'both'
  training.fp_wgt_type = 'll'
  training.alpha = 0.15
  training.beta = 0.01
  training.m = 2
  training.fp_dist = 'pert'
  # The released estimators: finite difference (hs, hd) and one Gaussian Hutchinson probe.
  training.fp_time_derivative = 'finite_difference'
  training.fp_fd_hs = 1e-3
  training.fp_fd_hd = 5e-4
  training.fp_divergence = 'hutchinson'
  training.fp_hutchinson_type = 'gaussian'
  training.fp_num_probes = 1
  training.fp_batch_fraction = 1.

  # Fine-tuning schedule: checkpoints every 5k steps, so the fine-tuned ones are a short, separate series.
  training.n_iters = pretrained_iters + FINE_TUNING_STEPS
  training.snapshot_freq = SNAPSHOT_FREQ
  training.snapshot_freq_for_preemption = 1000
  training.snapshot_sampling = False
  training.log_freq = 50
  training.eval_freq = 500
  # optim.warmup stays Score SDE's 5000: past it, every step sets the learning rate to optim.lr, so a
  # restored checkpoint trains at the config's rate (no second warm-up, since step >> warmup).

  evaluate = config.eval
  # The fine-tuned checkpoints: those written after Score SDE's n_iters. References, so that overriding
  # training.n_iters or training.snapshot_freq on the command line moves the range with them.
  n_iters = training.get_ref('n_iters')
  snapshot_freq = training.get_ref('snapshot_freq')
  evaluate.begin_ckpt = pretrained_iters // snapshot_freq + 1
  # Training's last save, at step n_iters, is checkpoint_{n_iters // snapshot_freq} (checkpoints.Checkpointer.save_due).
  evaluate.end_ckpt = n_iters // snapshot_freq
  evaluate.enable_bpd = True  # the paper's headline metric is NLL (bits/dim)
  evaluate.enable_fp_residual = True
  evaluate.fp_residual_num_times = 10
  evaluate.fp_residual_num_batches = 1
  return config
