"""Fields this fork adds to Score SDE's configs: the FP-Diffusion regularizer, evaluation, sampling and data
options.

Each default file (`default_{cifar10,celeba,lsun}_configs.py`) writes out Score SDE's own fields as Score SDE
has them and then calls `add_fp_diffusion_fields`, so the added fields are defined once. The score-FPE
regularizer is off (`training.alpha = training.beta = 0`), so every Score SDE config trains exactly as in
Score SDE; `configs/fp/` turns it on with the paper's values.
"""


def add_fp_diffusion_fields(config):
  """Adds the FP-Diffusion, evaluation, sampling and data fields to a Score SDE config, in place.

  Args:
    config: an `ml_collections.ConfigDict` with `training`, `sampling`, `eval` and `data` sub-configs.

  Returns:
    `config`, for chaining.
  """
  training = config.training
  ## Score Fokker-Planck (FP-Diffusion) regularizer; see docs/score_fpe.md. Off while alpha = beta = 0.
  training.scalar_fp = 'both'  # 'False' (vector residual only), 'True' (scalar only), 'both'
  training.fp_wgt_type = 'll'  # lambda(t): 'constant' (1), 'convention' (g), 'll' (g^2)
  training.alpha = 0.  # weight of the vector residual term
  training.beta = 0.  # weight of the scalar residual term
  training.m = 2  # power of the vector residual's norm
  training.fp_dist = 'pert'  # where the residual is evaluated: 'pert' (x_t of the DSM), 'x' (data), 'random'
  training.fp_time_derivative = 'finite_difference'  # d_t s: 'finite_difference' or 'forward_ad' (exact)
  training.fp_fd_hs = 1e-3  # backward step of the finite difference
  training.fp_fd_hd = 5e-4  # forward step of the finite difference
  training.fp_divergence = 'hutchinson'  # div_x s: 'hutchinson' or 'exact' (D backward passes: small D only)
  training.fp_hutchinson_type = 'gaussian'  # probe: 'gaussian' or 'rademacher'
  training.fp_num_probes = 1  # probes per sample for the Hutchinson estimator
  training.fp_batch_fraction = 1.  # fraction of the batch on which the FP term is computed
  # Lazy regularization (as StyleGAN2's R1): the FP terms only on the steps whose global step is a multiple of
  # fp_every, at fp_every x their weight (the same expected gradient); DSM at every step. 1: every step (paper).
  training.fp_every = 1
  # Dropout masks of the finite difference's 3 evaluations: 'shared' (one set: the derivative of one network)
  # or 'independent' (new masks for each, as the released code: a ~1e3 times larger R_vec with dropout 0.1).
  training.fp_dropout_masks = 'shared'

  ## Scale-out (docs/workflow.md, "Multi-GPU"); the defaults are Score SDE's numerics in one process.
  training.mixed_precision = 'no'  # 'no' (float32), 'bf16' or 'fp16' autocast of the loss's forward pass
  training.grad_accum_steps = 1  # micro-batches per optimizer step (training.batch_size stays the global batch)
  training.compile = False  # torch.compile the model's forward pass (DSM and sampling; not the FP term)

  ## When a run dies (docs/workflow.md, "When a run dies").
  # No checkpoint is written if, since the last one, the largest |trainable parameter| grew more than this
  # factor (relative to max(1, its value then)): an exploded update. NaN/inf are always refused; inf disables
  # the growth bound.
  training.max_param_growth = 1e3
  # Under torchrun: how long a collective (and joining the process group) waits for the other ranks before the
  # run stops with an error naming what was lost. It must exceed the longest time one rank works while the
  # others wait: rank 0's checkpoint save and snapshot sampling in training, one sampling round or bits/dim
  # batch of one rank in evaluation. A peer that dies is noticed at once whatever this is; it bounds hangs.
  training.dist_timeout_seconds = 3600.

  evaluate = config.eval
  evaluate.bpd_num_repeats = 5  # Score SDE hard-codes 5 passes over the test split (1 over train)
  evaluate.enable_fp_residual = False  # score-FPE residual as a function of t (docs/score_fpe.md)
  evaluate.fp_residual_num_times = 10  # points of the t grid, uniform in [sampling_eps, T]
  evaluate.fp_residual_num_batches = 1  # eval batches per t
  # Conservativity: ||J - J^T||_F / ||J||_F of the score's Jacobian in x, on the residual's t grid and batches
  # (docs/score_fpe.md). Probes: 0 is the exact Jacobian (data of at most 64 dimensions), k > 0 is k Rademacher
  # probes per sample (images).
  evaluate.enable_conservativity = False
  evaluate.conservativity_num_probes = 0
  # Inception network for FID/IS/KID: a TF-Hub handle, or a local directory holding the SavedModel.
  evaluate.inception_model = 'https://tfhub.dev/tensorflow/tfgan/eval/inception/1'
  evaluate.stats_path = ''  # dataset statistics for FID; '' means Score SDE's assets/stats/ file name
  # Solver of the probability-flow ODE for bits/dim: 'torch' (torchdiffeq on the model's device) or 'scipy'
  # (Score SDE's solve_ivp on the CPU, the batch copied to and from the device at every evaluation). Same
  # tolerances and RK45 step control; torch measured faster per batch (docs/performance.md).
  evaluate.ode_backend = 'torch'

  # The same choice for the ODE sampler (sampling.method = 'ode').
  config.sampling.ode_backend = 'torch'

  # Waiting for a checkpoint training has not written yet: stop when no live trainer holds W/train.lock, and
  # in any case after this many seconds per checkpoint (inf: as long as the trainer runs).
  evaluate.wait_limit_seconds = 86400.
  evaluate.skip_missing_ckpts = False  # True: skip a checkpoint no trainer will write, instead of stopping

  data = config.data
  data.data_dir = ''  # tfds data directory ('' = tfds default); lets tfds read manually prepared data
  data.path = ''  # dataset file for data.dataset = 'NPZ'
  return config
