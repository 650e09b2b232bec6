"""All functions related to loss computation and optimization (Score SDE), with FP-Diffusion's score-FPE term.

The continuous-time loss is Score SDE's denoising score matching (DSM) loss, plus, when `alpha` or `beta` is
positive, FP-Diffusion's score Fokker-Planck regularizer (docs/score_fpe.md):

  loss = DSM + alpha R_vec + beta R_sc,
  R_vec = mean over the batch of lambda(t) |d_t s - grad_x Phi|_2^m / D^m,
  R_sc  = L2 norm over the batch of 1/2 g^2 [div_x s + |s|^2] - <f, s>,

with the residuals computed once for every SDE by `score_fpe.py`. With alpha = beta = 0 (the default of every
Score SDE config) the loss and its cost are exactly Score SDE's.
"""

import contextlib
import logging
import math

import torch
import torch.optim as optim

import score_fpe
import utils
from models import utils as mutils
from sde_lib import VESDE, VPSDE

OPTIMIZERS = ('Adam',)
SCALAR_FP = ('False', 'True', 'both')
FP_DISTS = ('pert', 'x', 'random')


def get_optimizer(config, params):
  """Returns the optimizer that `config.optim` describes (Adam, as Score SDE)."""
  optim_config = config.optim
  utils.check_choice('optim.optimizer', optim_config.optimizer, OPTIMIZERS)
  lr = utils.check_number('optim.lr', optim_config.lr, low=0.)
  beta1 = utils.check_number('optim.beta1', optim_config.beta1, low=0., high=1., high_open=True)
  adam_eps = utils.check_number('optim.eps', optim_config.eps, low=0.)
  weight_decay = utils.check_number('optim.weight_decay', optim_config.weight_decay, low=0.)
  return optim.Adam(params, lr=lr, betas=(beta1, 0.999), eps=adam_eps, weight_decay=weight_decay)


def optimization_manager(config):
  """Returns an optimize_fn based on `config`: linear learning-rate warmup and gradient-norm clipping."""
  lr_default = utils.check_number('optim.lr', config.optim.lr, low=0.)
  warmup_default = utils.check_number('optim.warmup', config.optim.warmup, low=0, integer=True)
  grad_clip_default = utils.check_number('optim.grad_clip', config.optim.grad_clip)

  def optimize_fn(optimizer, params, step, lr=lr_default, warmup=warmup_default, grad_clip=grad_clip_default):
    """Optimizes with warmup and gradient clipping (disabled if negative)."""
    # Every step, also without warmup (where Score SDE leaves the rate alone): an optimizer restored from a
    # checkpoint would otherwise keep the checkpoint's rate and silently ignore optim.lr.
    factor = min(step / warmup, 1.0) if warmup > 0 else 1.0
    for g in optimizer.param_groups:
      g['lr'] = lr * factor
    if grad_clip >= 0:
      torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
    optimizer.step()

  return optimize_fn


def _reduce_op(reduce_mean):
  if reduce_mean:
    return torch.mean
  return lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)


def check_fp_options(scalar_fp='both', fp_dist='pert', fp_wgt_type='ll', alpha=0., beta=0., m=2,
                     fp_batch_fraction=1.):
  """Validates the FP-Diffusion loss options; errors name the `config.training` field."""
  utils.check_choice('training.scalar_fp', scalar_fp, SCALAR_FP)
  utils.check_choice('training.fp_dist', fp_dist, FP_DISTS)
  utils.check_choice('training.fp_wgt_type', fp_wgt_type, score_fpe.FP_WEIGHTINGS)
  utils.check_number('training.alpha', alpha, low=0.)
  utils.check_number('training.beta', beta, low=0.)
  utils.check_number('training.m', m, low=0., low_open=True)
  utils.check_number('training.fp_batch_fraction', fp_batch_fraction, low=0., high=1., low_open=True)


def fp_terms_active(scalar_fp, alpha, beta):
  """(vector, scalar): which FP terms enter the loss; a term with weight 0 is never computed."""
  vector = scalar_fp in ('False', 'both') and alpha > 0
  scalar = scalar_fp in ('True', 'both') and beta > 0
  return vector, scalar


def get_sde_loss_fn(sde, train, reduce_mean=True, continuous=True, likelihood_weighting=True, eps=1e-5,
                    scalar_fp='both', fp_dist='pert', fp_wgt_type='ll', alpha=0., beta=0., m=2,
                    fp_time_derivative='finite_difference', fp_fd_hs=1e-3, fp_fd_hd=5e-4,
                    fp_divergence='hutchinson', fp_hutchinson_type='gaussian', fp_num_probes=1,
                    fp_batch_fraction=1., return_terms=False):
  """Create a loss function for training with arbitrary SDEs: DSM, plus the score-FPE regularizer.

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    train: `True` for training loss and `False` for evaluation loss.
    reduce_mean: If `True`, average the loss across data dimensions. Otherwise sum the loss across data dimensions.
    continuous: `True` indicates that the model is defined to take continuous time steps. Otherwise it requires
      ad-hoc interpolation to take continuous time steps.
    likelihood_weighting: If `True`, weight the mixture of score matching losses
      according to https://arxiv.org/abs/2101.09258; otherwise use the weighting recommended in our paper.
    eps: A `float` number. The smallest time step to sample from.
    scalar_fp: which FP terms: 'False' (vector residual), 'True' (scalar term), 'both'.
    fp_dist: where the FP residual is evaluated: 'pert' (the DSM's x_t and t, sharing its network
      evaluation), 'x' (the clean data at the DSM's t), 'random' (uniform in [batch.min(), batch.max()]^D).
    fp_wgt_type: lambda(t) of the vector term: 'constant' (1), 'convention' (g), 'll' (g^2).
    alpha, beta: weights of the vector and scalar terms (0 = not computed).
    m: power of the vector residual's norm.
    fp_time_derivative: 'finite_difference' (steps `fp_fd_hs`, `fp_fd_hd`, kept in [eps, T]) or
      'forward_ad' (exact).
    fp_divergence: 'hutchinson' (`fp_hutchinson_type` 'gaussian'/'rademacher', `fp_num_probes`) or 'exact'.
    fp_batch_fraction: the FP terms use the first ceil(fp_batch_fraction * B) samples.
    return_terms: if `True`, the loss function returns a dict: 'loss' (differentiable), 'dsm', 'fp_vector'
      (R_vec), 'fp_scalar' (R_sc); a term that is not computed is NaN.

  Returns:
    A loss function `loss_fn(model, batch, t=None, z=None)`; `t` (B,) and `z` (shape of batch) optionally fix
    the DSM's times and noise (for tests and diagnostics).
  """
  check_fp_options(scalar_fp, fp_dist, fp_wgt_type, alpha, beta, m, fp_batch_fraction)
  vector_on, scalar_on = fp_terms_active(scalar_fp, alpha, beta)
  fp_on = vector_on or scalar_on
  fpe = None
  if fp_on:
    if not continuous:
      raise ValueError('The score-FPE term (training.alpha or training.beta > 0) needs a continuous-time '
                       'model (training.continuous=True): the score must be differentiable in t.')
    fpe = score_fpe.ScoreFPE(sde, eps=eps, time_derivative=fp_time_derivative, fd_hs=fp_fd_hs, fd_hd=fp_fd_hd,
                             divergence=fp_divergence, hutchinson_type=fp_hutchinson_type,
                             num_probes=fp_num_probes)
  reduce_op = _reduce_op(reduce_mean)

  def fp_loss_terms(score_fn, x, t, evaluation, batch_size):
    """R_vec and R_sc at (x, t), x a leaf requiring grad from which `evaluation` was computed."""
    res = fpe.residuals(score_fn, x, t, evaluation, vector=vector_on, scalar=scalar_on, create_graph=train)
    r_vec = r_sc = None
    if vector_on:
      lam = score_fpe.fp_time_weight(sde, t, fp_wgt_type)
      r_vec = torch.mean(lam * score_fpe.per_sample_vector_term(res['vector'], m))
    if scalar_on:
      # The released code's L2 norm over the batch; on a fraction k of the batch B it is rescaled by
      # sqrt(B / k), so that it estimates the same quantity as on the whole batch.
      r_sc = torch.linalg.vector_norm(res['scalar']) * math.sqrt(batch_size / x.shape[0])
    return r_vec, r_sc

  def loss_fn(model, batch, t=None, z=None):
    """Compute the loss function.

    Args:
      model: A score model.
      batch: A mini-batch of training data.
      t, z: optional times and noise of the DSM (default: drawn here).

    Returns:
      loss: A scalar that represents the average loss value across the mini-batch (or the dict of terms).
    """
    score_fn = mutils.get_score_fn(sde, model, train=train, continuous=continuous)
    B = batch.shape[0]
    if t is None:
      t = torch.rand(B, device=batch.device) * (sde.T - eps) + eps
    if z is None:
      z = torch.randn_like(batch)
    mean, std = sde.marginal_prob(batch, t)
    perturbed_data = mean + utils.expand_batch(std, batch) * z
    k = math.ceil(fp_batch_fraction * B) if fp_on else 0
    # Autograd in x is needed for the FP term even when the caller (an eval step) runs under no_grad.
    with torch.enable_grad() if fp_on else contextlib.nullcontext():
      if fp_on and fp_dist == 'pert':
        # One network evaluation at (x_t, t) serves both the DSM and the FP term (and, by forward-mode AD,
        # d_t s too). On a fraction of the batch, the rest is evaluated separately, so that the
        # higher-order derivatives run through the first k samples only.
        x_fp = perturbed_data[:k].detach().requires_grad_(True)
        t_fp = t[:k]
        evaluation = fpe.evaluate_score(score_fn, x_fp, t_fp, with_time_derivative=vector_on)
        score = evaluation.s
        if k < B:
          score = torch.cat([score, score_fn(perturbed_data[k:], t[k:])], dim=0)
      else:
        score = score_fn(perturbed_data, t)

      if not likelihood_weighting:
        losses = torch.square(score * utils.expand_batch(std, score) + z)
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1)
      else:
        g2 = sde.diffusion(t) ** 2
        losses = torch.square(score + z / utils.expand_batch(std, score))
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1) * g2
      dsm = torch.mean(losses)

      loss = dsm
      r_vec = r_sc = None
      if fp_on:
        if fp_dist != 'pert':
          if fp_dist == 'x':
            xx = batch[:k]
          else:
            # 'random': uniform over the range the batch spans, as the released code.
            low, high = batch.min(), batch.max()
            xx = low + (high - low) * torch.rand_like(batch[:k])
          x_fp = xx.detach().requires_grad_(True)
          t_fp = t[:k]
          evaluation = fpe.evaluate_score(score_fn, x_fp, t_fp, with_time_derivative=vector_on)
        r_vec, r_sc = fp_loss_terms(score_fn, x_fp, t_fp, evaluation, B)
        if r_vec is not None:
          loss = loss + alpha * r_vec
        if r_sc is not None:
          loss = loss + beta * r_sc

    if not return_terms:
      return loss
    nan = torch.full((), float('nan'), device=batch.device)
    return {
        'loss': loss,
        'dsm': dsm.detach(),
        'fp_vector': nan if r_vec is None else r_vec.detach(),
        'fp_scalar': nan if r_sc is None else r_sc.detach(),
    }

  return loss_fn


def get_smld_loss_fn(vesde, train, reduce_mean=False):
  """Legacy code to reproduce previous results on SMLD(NCSN). Not recommended for new work."""
  if not isinstance(vesde, VESDE):
    raise ValueError(f'SMLD training only works for VESDEs, not {type(vesde).__name__}.')

  # Previous SMLD models assume descending sigmas
  smld_sigma_array = torch.flip(vesde.discrete_sigmas, dims=(0,))
  reduce_op = _reduce_op(reduce_mean)

  def loss_fn(model, batch):
    model_fn = mutils.get_model_fn(model, train=train)
    labels = torch.randint(0, vesde.N, (batch.shape[0],), device=batch.device)
    sigmas = smld_sigma_array.to(batch.device)[labels]
    noise = torch.randn_like(batch) * utils.expand_batch(sigmas, batch)
    perturbed_data = noise + batch
    score = model_fn(perturbed_data, labels)
    target = -noise / utils.expand_batch(sigmas ** 2, batch)
    losses = torch.square(score - target)
    losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1) * sigmas ** 2
    return torch.mean(losses)

  return loss_fn


def get_ddpm_loss_fn(vpsde, train, reduce_mean=True):
  """Legacy code to reproduce previous results on DDPM. Not recommended for new work."""
  if not isinstance(vpsde, VPSDE):
    raise ValueError(f'DDPM training only works for VPSDEs, not {type(vpsde).__name__}.')

  reduce_op = _reduce_op(reduce_mean)

  def loss_fn(model, batch):
    model_fn = mutils.get_model_fn(model, train=train)
    labels = torch.randint(0, vpsde.N, (batch.shape[0],), device=batch.device)
    sqrt_alphas_cumprod = vpsde.sqrt_alphas_cumprod.to(batch.device)
    sqrt_1m_alphas_cumprod = vpsde.sqrt_1m_alphas_cumprod.to(batch.device)
    noise = torch.randn_like(batch)
    perturbed_data = (utils.expand_batch(sqrt_alphas_cumprod[labels], batch) * batch +
                      utils.expand_batch(sqrt_1m_alphas_cumprod[labels], batch) * noise)
    score = model_fn(perturbed_data, labels)
    losses = torch.square(score - noise)
    losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1)
    return torch.mean(losses)

  return loss_fn




def _set_requires_grad(params, flags):
  for p, flag in zip(params, flags):
    p.requires_grad_(flag)


def get_step_fn(sde, train, optimize_fn=None, reduce_mean=False, continuous=True, likelihood_weighting=False,
                scalar_fp='both', fp_dist='pert', fp_wgt_type='ll', alpha=0., beta=0., m=2,
                fp_time_derivative='finite_difference', fp_fd_hs=1e-3, fp_fd_hd=5e-4, fp_divergence='hutchinson',
                fp_hutchinson_type='gaussian', fp_num_probes=1, fp_batch_fraction=1., return_terms=False):
  """Create a one-step training/evaluation function.

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    optimize_fn: An optimization function.
    reduce_mean: If `True`, average the loss across data dimensions. Otherwise sum the loss across data dimensions.
    continuous: `True` indicates that the model is defined to take continuous time steps.
    likelihood_weighting: If `True`, weight the mixture of score matching losses according to
      https://arxiv.org/abs/2101.09258; otherwise use the weighting recommended by our paper.
    scalar_fp, fp_dist, fp_wgt_type, alpha, beta, m, fp_*: the score-FPE term, see `get_sde_loss_fn`.
    return_terms: if `True`, the step returns a dict of detached 0-dim tensors 'loss', 'dsm', 'fp_vector',
      'fp_scalar' (NaN for a term that is not computed) instead of the loss.

  Returns:
    A one-step function `step_fn(state, batch)` for training or evaluation.
  """
  check_fp_options(scalar_fp, fp_dist, fp_wgt_type, alpha, beta, m, fp_batch_fraction)
  if continuous:
    loss_fn = get_sde_loss_fn(sde, train, reduce_mean=reduce_mean, continuous=True,
                              likelihood_weighting=likelihood_weighting, scalar_fp=scalar_fp, fp_dist=fp_dist,
                              fp_wgt_type=fp_wgt_type, alpha=alpha, beta=beta, m=m,
                              fp_time_derivative=fp_time_derivative, fp_fd_hs=fp_fd_hs, fp_fd_hd=fp_fd_hd,
                              fp_divergence=fp_divergence, fp_hutchinson_type=fp_hutchinson_type,
                              fp_num_probes=fp_num_probes, fp_batch_fraction=fp_batch_fraction,
                              return_terms=True)
  else:
    if likelihood_weighting:
      raise ValueError('Likelihood weighting is not supported for original SMLD/DDPM training '
                       '(training.continuous=False).')
    if any(fp_terms_active(scalar_fp, alpha, beta)):
      raise ValueError(f'The score-FPE term (training.alpha={alpha!r}, training.beta={beta!r}) is not supported '
                       'for original SMLD/DDPM training (training.continuous=False); set both to 0.')
    # Score SDE's discrete (legacy) objectives: SMLD for VE, DDPM for VP; sub-VP has none.
    if isinstance(sde, VESDE):
      discrete_loss_fn = get_smld_loss_fn(sde, train, reduce_mean=reduce_mean)
    elif isinstance(sde, VPSDE):
      discrete_loss_fn = get_ddpm_loss_fn(sde, train, reduce_mean=reduce_mean)
    else:
      raise ValueError(f'Discrete training for {type(sde).__name__} is not recommended.')

    def loss_fn(model, batch):
      dsm = discrete_loss_fn(model, batch)
      nan = torch.full((), float('nan'), device=batch.device)
      return {'loss': dsm, 'dsm': dsm.detach(), 'fp_vector': nan, 'fp_scalar': nan}

  def step_fn(state, batch):
    """Running one step of training or evaluation.

    Args:
      state: A dictionary of training information, containing the score model, optimizer,
       EMA status, and number of optimization steps.
      batch: A mini-batch of training/evaluation data.

    Returns:
      loss: The average loss value of this state (or the dict of terms with `return_terms`).
    """
    model = state['model']
    if train:
      optimizer = state['optimizer']
      optimizer.zero_grad()
      terms = loss_fn(model, batch)
      terms['loss'].backward()
      optimize_fn(optimizer, model.parameters(), step=state['step'])
      state['step'] += 1
      state['ema'].update(model.parameters())
      terms['loss'] = terms['loss'].detach()
    else:
      ema = state['ema']
      params = list(model.parameters())
      flags = [p.requires_grad for p in params]
      ema.store(params)
      ema.copy_to(params)
      # No parameter graph in evaluation; the FP term enables autograd in x by itself (loss_fn).
      _set_requires_grad(params, [False] * len(params))
      try:
        with torch.no_grad():
          terms = loss_fn(model, batch)
      finally:
        _set_requires_grad(params, flags)
        ema.restore(params)
      terms = {name: value.detach() for name, value in terms.items()}
    return terms if return_terms else terms['loss']

  return step_fn


def step_fn_from_config(config, sde, train, optimize_fn=None, return_terms=False):
  """The step function that `config.training` describes; reads and validates every field the loss uses.

  Args:
    config: the experiment's config.
    sde: the forward SDE (`sde_lib.sde_from_config(config)`).
    train: `True` for the training step, `False` for the evaluation step.
    optimize_fn: `optimization_manager(config)` for training.
    return_terms: see `get_step_fn`.

  Returns:
    `step_fn(state, batch)`.
  """
  training = config.training
  continuous = utils.check_bool('training.continuous', training.continuous)
  reduce_mean = utils.check_bool('training.reduce_mean', training.reduce_mean)
  likelihood_weighting = utils.check_bool('training.likelihood_weighting', training.likelihood_weighting)
  fp = dict(scalar_fp=training.scalar_fp, fp_dist=training.fp_dist, fp_wgt_type=training.fp_wgt_type,
            alpha=training.alpha, beta=training.beta, m=training.m,
            fp_batch_fraction=training.fp_batch_fraction)
  check_fp_options(**fp)
  estimator = dict(fp_time_derivative=training.fp_time_derivative, fp_fd_hs=training.fp_fd_hs,
                   fp_fd_hd=training.fp_fd_hd, fp_divergence=training.fp_divergence,
                   fp_hutchinson_type=training.fp_hutchinson_type, fp_num_probes=training.fp_num_probes)
  # The estimator fields are validated even while the FP term is off, so a typo never waits for alpha > 0.
  score_fpe.fpe_from_config(config, sde)
  if train and optimize_fn is None:
    raise ValueError('A training step needs optimize_fn (losses.optimization_manager(config)).')
  if any(fp_terms_active(fp['scalar_fp'], fp['alpha'], fp['beta'])):
    logging.info('Score-FPE regularizer on: %s', {**fp, **estimator})
  return get_step_fn(sde, train, optimize_fn=optimize_fn, reduce_mean=reduce_mean, continuous=continuous,
                     likelihood_weighting=likelihood_weighting, return_terms=return_terms, **fp, **estimator)
