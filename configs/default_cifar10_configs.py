"""Defaults shared by the CIFAR-10 configs: Score SDE's values, plus the FP-Diffusion fields.

The score-FPE regularizer is off by default (`training.alpha = training.beta = 0`), so every Score SDE config
trains exactly as in Score SDE; `configs/fp/` turns it on with the paper's values.
"""

import ml_collections
import torch


def get_default_configs():
  config = ml_collections.ConfigDict()
  # training
  config.training = training = ml_collections.ConfigDict()
  config.training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  ## store additional checkpoints for preemption in cloud computing environments
  training.snapshot_freq_for_preemption = 10000
  ## produce samples at each snapshot.
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.continuous = True
  training.reduce_mean = False
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

  # sampling
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16

  # evaluation
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_repeats = 5  # Score SDE hard-codes 5 rounds over the dataset
  evaluate.enable_fp_residual = False  # score-FPE residual as a function of t (docs/score_fpe.md)
  evaluate.fp_residual_num_times = 10  # points of the t grid, uniform in [sampling_eps, T]
  evaluate.fp_residual_num_batches = 1  # eval batches per t
  # Inception network for FID/IS/KID: a TF-Hub handle, or a local directory holding the SavedModel.
  evaluate.inception_model = 'https://tfhub.dev/tensorflow/tfgan/eval/inception/1'
  evaluate.stats_path = ''  # dataset statistics for FID; '' means Score SDE's assets/stats/ file name

  # data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3
  data.data_dir = ''  # tfds data directory ('' = tfds default); lets tfds read manually prepared data
  data.path = ''  # dataset file for data.dataset = 'NPZ'

  # model
  config.model = model = ml_collections.ConfigDict()
  model.sigma_min = 0.01
  model.sigma_max = 50
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.1
  model.embedding_type = 'fourier'

  # optimization
  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.

  config.seed = 42
  config.device = torch.device('cuda:0') if torch.cuda.is_available() else torch.device('cpu')

  return config
