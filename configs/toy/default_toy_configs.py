"""Defaults of the embedded 2-D demo: a small MLP score model on a toy density (`data.dataset = 'TOY'`).

Sizes are chosen so that `demo.py` trains and evaluates four models (VE and VP, each with DSM alone and with
DSM + score-FPE) in a few minutes on 2 CPU cores. Overrides: `ve_dsm.py`, `ve_fp.py`, `vp_dsm.py`, `vp_fp.py`.
"""

import ml_collections
import torch

from configs.fp_defaults import add_fp_diffusion_fields


def get_default_configs():
  """Returns the toy defaults (Score SDE's fields, the FP-Diffusion fields, and the toy data fields)."""
  config = ml_collections.ConfigDict()
  # training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 256
  # demo.py trains the first 3000 steps (DSM) once per SDE, then fine-tunes the DSM and DSM + FP variants to 3500
  # (500 steps: the study, `study.py`, runs about 50 of them on one CPU core). VP: 6000 + 500 (vp_dsm.py).
  training.n_iters = 3500
  # One checkpoint, at the end of training: the demo evaluates checkpoint_1.
  training.snapshot_freq = 3500
  training.log_freq = 500
  training.eval_freq = 1000
  training.snapshot_freq_for_preemption = 1000
  training.snapshot_sampling = False
  training.likelihood_weighting = False
  training.continuous = True
  # For D = 2 both reductions give the same loss (0.5 * sum over 2 dims = mean); Score SDE's VE default.
  training.reduce_mean = False

  # sampling: the probability-flow ODE, the same model of the density as the likelihood.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'ode'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'none'
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16

  # evaluation
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 1
  evaluate.batch_size = 1000
  evaluate.enable_sampling = True
  evaluate.num_samples = 2000
  evaluate.enable_loss = True
  evaluate.enable_bpd = True
  evaluate.bpd_dataset = 'test'

  # data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'TOY'
  data.image_size = 1
  data.random_flip = False
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 2

  # model
  config.model = model = ml_collections.ConfigDict()
  model.name = 'mlp'
  # Score SDE's sigma_max rule (technique 1 of Song & Ermon, 2020): about the largest distance between two
  # data points; every toy density lies in about [-2, 2]^2, whose diagonal is 5.7.
  model.sigma_min = 0.01
  model.sigma_max = 6.
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.
  model.embedding_type = 'fourier'
  # Frequencies of the Fourier features of log(sigma): log(sigma) spans about 6.4, so a scale of 1 gives a few
  # periods over the range, a smooth function of t (Score SDE's 16 suits image models, not a d/dt penalty).
  model.fourier_scale = 1.
  model.scale_by_sigma = True
  # 66k parameters: a DSM step takes about 5 ms, a DSM + FP step about 20 ms on one CPU core.
  model.nf = 64
  model.num_layers = 2
  model.ema_rate = 0.999

  # optimization
  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  # With the cosine decay below, 3e-3 brings the 3000-step DSM model within 0.1 bits/dim of the true NLL; 1e-3
  # left it 0.6 bits/dim off, even at width 128 with 3 blocks (docs/demo.md).
  optim.lr = 3e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 100
  optim.grad_clip = 1.
  # Cosine decay to 0 at training.n_iters (not in Score SDE, whose rate stays constant): the pretraining run
  # (n_iters = 3000 in demo.py) ends converged, at rate 0; fine-tuning (3000 to 3500) then follows the cosine of
  # 3500 steps, at 1.5e-4 decaying to 0 (VP, 6000 to 6500: 4.4e-5 to 0; a constant 3e-3 would first undo the
  # convergence).
  optim.schedule = 'cosine'

  config.seed = 42
  config.device = torch.device('cuda:0') if torch.cuda.is_available() else torch.device('cpu')

  add_fp_diffusion_fields(config)
  # The score-FPE regularizer (weights in `{ve,vp}_fp.py`). Only the vector residual r = d_t s - grad_x Phi,
  # which is zero for the true score: the released code's "scalar" term is not zero for the true score (it is
  # d_t log p_t + div f, not a residual), so penalizing it would bias the score; training.beta stays 0.
  training.scalar_fp = 'False'
  # lambda(t) = g(t)^2, the paper's choice: for the VE SDE it makes every t contribute alike, as the DSM
  # loss's sigma^2 weighting does (the residual scales like 1 / sigma).
  training.fp_wgt_type = 'll'
  training.m = 2
  # D = 2: the exact divergence costs 2 backward passes, and is noise-free.
  training.fp_divergence = 'exact'
  data.toy = 'gmm'  # 'checkerboard', 'gmm', 'swissroll' or 'rings' (toy.TOY_DENSITIES)
  data.toy_eval_batches = 1  # evaluation sets: this many batches of eval.batch_size points
  # Continuous data and exact traces make every round over the test set give the same bits/dim.
  evaluate.bpd_num_repeats = 1
  evaluate.enable_fp_residual = True
  evaluate.fp_residual_num_times = 20
  evaluate.fp_residual_num_batches = 1
  # The paper's second claim: the relative asymmetry of the score's Jacobian, exact for D = 2, on the
  # residual's x_t and t grid.
  evaluate.enable_conservativity = True
  return config
