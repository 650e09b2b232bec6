"""All functions related to loss computation and optimization (Score SDE), with FP-Diffusion's score-FPE term.

The continuous-time loss is Score SDE's denoising score matching (DSM) loss, plus, when `alpha` or `beta` is
positive, FP-Diffusion's score Fokker-Planck regularizer (docs/score_fpe.md):

  loss = DSM + alpha R_vec + beta R_sc,
  R_vec = mean over the batch of lambda(t) |d_t s - grad_x Phi|_2^m / D^m,
  R_sc  = L2 norm over the batch of 1/2 g^2 [div_x s + |s|^2] - <f, s>,

with the residuals computed once for every SDE by `score_fpe.py`. With alpha = beta = 0 (the default of every
Score SDE config) the loss and its cost are exactly Score SDE's.

Losses are small objects built once from the config (`loss_from_config`), validated at construction: a field that
one module reads (`optim.*` here, the regularizer's in `score_fpe`) is checked where it is consumed; one that other
modules read too (`training.continuous`, `training.reduce_mean`, `training.likelihood_weighting`,
`training.n_iters`, `optim.lr`) has its rule in `utils.CONFIG_FIELDS`, applied by `utils.config_value` wherever it
is read. A loss reports its terms per sample, by name (`'dsm'`, and each regularizer's, e.g. `'fp_vector'`,
`'fp_scalar'`), and knows how to reduce them and the weighted sum that is the training objective. Score SDE's
functions (`get_sde_loss_fn`, `get_smld_loss_fn`, `get_ddpm_loss_fn`, `get_step_fn`) keep their names, signatures
and behaviour as thin wrappers over these objects; the regularizer's options they take are `score_fpe.FP_OPTIONS`.
A new regularizer is a class with the interface of `score_fpe.ScoreFPERegularizer` (its own module and config
block) added to `REGULARIZERS`.

The step primitives (`apply_update`, `eval_terms`, `check_optimize_fn`) and the schedule of lazy regularization
(`LazyRegularization`, `training.fp_every`) are shared by Score SDE's one-process `get_step_fn` here and by
`trainer.Trainer`, which sits above this module.
"""

import abc
import collections
import logging
import math

import torch
import torch.optim as optim

import score_fpe
import utils
from models import ema as ema_lib
from models import utils as mutils
from sde_lib import VESDE, VPSDE

OPTIMIZERS = ('Adam',)
# The FP options' allowed values (score_fpe's), under the names this module has always had.
SCALAR_FP = score_fpe.SCALAR_FP
FP_DISTS = score_fpe.FP_DISTS

# The regularizers `loss_from_config` builds: classes with `from_config(config, sde, *, continuous)` (see
# `score_fpe.ScoreFPERegularizer` for the interface). One that is off reports no terms and costs nothing.
REGULARIZERS = (score_fpe.ScoreFPERegularizer,)

def get_optimizer(config, params):
  """Returns the optimizer that `config.optim` describes (Adam, as Score SDE)."""
  optim_config = config.optim
  utils.check_choice('optim.optimizer', optim_config.optimizer, OPTIMIZERS)
  lr = utils.config_value(config, 'optim.lr')
  beta1 = utils.check_number('optim.beta1', optim_config.beta1, low=0., high=1., high_open=True)
  adam_eps = utils.check_number('optim.eps', optim_config.eps, low=0.)
  weight_decay = utils.check_number('optim.weight_decay', optim_config.weight_decay, low=0.)
  return optim.Adam(params, lr=lr, betas=(beta1, 0.999), eps=adam_eps, weight_decay=weight_decay)


LR_SCHEDULES = ('constant', 'cosine')


def lr_schedule_factor(schedule, step, n_iters):
  """The learning-rate multiplier of `optim.schedule` at `step`, on top of the warmup.

  'constant' (Score SDE's: 1 after warmup); 'cosine' (not in Score SDE): 0.5 (1 + cos(pi step / n_iters)),
  from 1 at step 0 to 0 at `training.n_iters`, and 0 after it.
  """
  if schedule == 'constant':
    return 1.0
  return 0.5 * (1. + math.cos(math.pi * min(step / n_iters, 1.)))


def optimization_manager(config):
  """Returns an optimize_fn based on `config`: linear learning-rate warmup, the learning-rate schedule
  (`optim.schedule`, 'constant' if the config has none) and gradient-norm clipping."""
  lr_default = utils.config_value(config, 'optim.lr')
  warmup_default = utils.check_number('optim.warmup', config.optim.warmup, low=0, integer=True)
  grad_clip_default = utils.check_number('optim.grad_clip', config.optim.grad_clip)
  # Score SDE's configs have no schedule field: their rate stays constant after warmup, bit for bit.
  schedule = utils.check_choice('optim.schedule', config.optim.get('schedule', 'constant'), LR_SCHEDULES)
  n_iters = 1
  if schedule != 'constant':
    n_iters = utils.config_value(config, 'training.n_iters', low=1)

  def optimize_fn(optimizer, params, step, lr=lr_default, warmup=warmup_default, grad_clip=grad_clip_default,
                  *, scaler=None):
    """Optimizes with warmup and gradient clipping (disabled if negative).

    `scaler` (not in Score SDE): a `torch.amp.GradScaler` whose scaled gradients are unscaled before clipping
    and which skips the update when they are not finite (float16 training).

    Returns:
      The gradient norm before clipping (a 0-dim tensor), or None when clipping is disabled.
    """
    # Every step, also without warmup (where Score SDE leaves the rate alone): an optimizer restored from a
    # checkpoint would otherwise keep the checkpoint's rate and silently ignore optim.lr.
    factor = min(step / warmup, 1.0) if warmup > 0 else 1.0
    factor *= lr_schedule_factor(schedule, int(step), n_iters)  # 1.0 for 'constant': Score SDE's rate, exactly
    for g in optimizer.param_groups:
      g['lr'] = lr * factor
    if scaler is not None:
      scaler.unscale_(optimizer)
    grad_norm = None
    if grad_clip >= 0:
      grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
    if scaler is not None:
      scaler.step(optimizer)
      scaler.update()
    else:
      optimizer.step()
    return grad_norm

  return optimize_fn


def _reduce_op(reduce_mean):
  if reduce_mean:
    return torch.mean
  return lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)


def _per_sample(losses, reduce_mean):
  """Score SDE's reduction over the data dimensions: mean, or half the sum."""
  return _reduce_op(reduce_mean)(losses.reshape(losses.shape[0], -1), dim=-1)


def reduce_term(values, reduction, batch_size, sum_over_ranks=None, world_size=1):
  """A term's per-sample values reduced to the number the loss adds up.

  Args:
    values: per-sample values, shape (n,).
    reduction: 'mean' (over the n samples), or 'norm': FP-Diffusion's L2 norm over a batch of `batch_size`,
      computed on n of its samples and rescaled by sqrt(batch_size / n) so that it estimates the same number.
    batch_size: the batch the values come from.
    sum_over_ranks: for 'norm' under torch.distributed, a function summing a tensor over ranks. The norm is
      then the one of the global batch (each rank holds an equal share), and its gradient on each rank is
      scaled so that averaging gradients over ranks gives the gradient of the global norm.
    world_size: the number of ranks `sum_over_ranks` sums over.

  Returns:
    A 0-dim tensor, differentiable.
  """
  if reduction == 'mean':
    return values.mean()
  if reduction != 'norm':
    raise ValueError(f'Unknown reduction {reduction!r}; expected "mean" or "norm".')
  scale = batch_size / values.shape[0]
  if sum_over_ranks is None or world_size == 1:
    return torch.linalg.vector_norm(values) * math.sqrt(scale)
  local = values.square().sum()
  others = sum_over_ranks(local.detach()) - local.detach()
  norm = torch.sqrt(scale * (local + others))
  # Value: the global norm. Gradient: world_size x the local share, which the gradient average restores.
  return norm.detach() + world_size * (norm - norm.detach())


class Loss(abc.ABC):
  """A training objective: per-sample terms by name, their reductions and weights.

  Subclasses set `reductions` (term name -> 'mean' or 'norm', see `reduce_term`) and `weights` (term name ->
  weight in the total) and implement `draw_noise` and `__call__`.
  """

  reductions = {'dsm': 'mean'}
  weights = {'dsm': 1.}

  @property
  def term_names(self):
    """The terms this loss reports, in a fixed order ('dsm' first)."""
    return tuple(self.weights)

  @property
  def regularizer_term_names(self):
    """The regularizers' terms: every term but 'dsm' (`regularize=False` skips them; lazy regularization)."""
    return tuple(name for name in self.weights if name != 'dsm')

  @abc.abstractmethod
  def draw_noise(self, shape, device, dtype=torch.float32, generator=None):
    """Everything random one evaluation of the loss on a batch of `shape` needs, as a dict of tensors whose
    first axis is the batch's: split with the batch, the noise stays with its samples (over ranks and
    micro-batches). `generator` None draws from torch's global generator (Score SDE's behaviour)."""

  @abc.abstractmethod
  def __call__(self, model, batch, train, noise=None, eager_model=None, regularize=True):
    """The per-sample terms on `batch`: a dict term name -> tensor of shape (n,).

    Args:
      model: the score model.
      batch: the data, already scaled, shape (B, ...).
      train: training (model in train mode, gradients through the terms) or evaluation.
      noise: `draw_noise`'s dict for this batch (default: drawn here).
      eager_model: the model to use where a compiled `model` cannot be (double backward); default `model`.
      regularize: compute the regularizers' terms; False: 'dsm' alone (the other steps of lazy
        regularization, `LazyRegularization`).
    """

  def reduce(self, per_sample, batch_size, sum_over_ranks=None, world_size=1):
    """term name -> 0-dim tensor (see `reduce_term`)."""
    return {name: reduce_term(values, self.reductions[name], batch_size, sum_over_ranks, world_size)
            for name, values in per_sample.items()}

  def total(self, reduced, regularizer_scale=1):
    """The objective: the weighted sum of the reduced terms, the regularizers' weights (every term but 'dsm')
    multiplied by `regularizer_scale` (lazy regularization's `fp_every`; 1 leaves the sum bit for bit)."""
    return sum(self.weights[name] * (1 if name == 'dsm' else regularizer_scale) * value
               for name, value in reduced.items())

  def terms(self, per_sample, batch_size, sum_over_ranks=None, world_size=1, regularizer_scale=1):
    """`{'loss': the objective, **the reduced terms}` from `__call__`'s per-sample terms (see `reduce`, and
    `total` for `regularizer_scale`). The reduced terms are reported at weight 1, whatever the scale."""
    reduced = self.reduce(per_sample, batch_size, sum_over_ranks, world_size)
    return {'loss': self.total(reduced, regularizer_scale), **reduced}

  def describe(self):
    """One line for the log."""
    return f'{type(self).__name__} (discrete time; no regularizer: they need continuous time)'


# The DSM loss's perturbation of a batch: x_t = mean(x0, t) + std(t) z.
Perturbed = collections.namedtuple('Perturbed', ['x0', 't', 'z', 'std', 'x_t'])


class SDELoss(Loss):
  """Score SDE's continuous-time DSM loss, plus regularizers (FP-Diffusion's score-FPE term).

  DSM per sample: |s(x_t, t) std(t) + z|^2 (Score SDE's weighting) or g(t)^2 |s(x_t, t) + z / std(t)|^2
  (likelihood weighting), reduced over the data dimensions by the mean or half the sum; then averaged over the
  batch.
  """

  def __init__(self, sde, reduce_mean=True, likelihood_weighting=True, eps=1e-5, regularizers=()):
    """Builds the loss; `regularizers` that are off (no active term) are dropped."""
    self.sde = sde
    self.reduce_mean = utils.check_field('training.reduce_mean', reduce_mean)
    self.likelihood_weighting = utils.check_field('training.likelihood_weighting', likelihood_weighting)
    self.eps = sde.check_eps(eps)
    self.all_regularizers = tuple(regularizers)
    self.regularizers = tuple(r for r in regularizers if r.active)
    shared = [r for r in self.regularizers if r.shares_evaluation]
    if len(shared) > 1:
      raise ValueError('At most one regularizer can share the DSM loss\'s network evaluation.')
    self._shared = shared[0] if shared else None
    self.reductions = dict(Loss.reductions)
    self.weights = dict(Loss.weights)
    for r in self.regularizers:
      self.reductions.update({name: r.reductions[name] for name in r.term_names})
      self.weights.update(r.weights)

  def describe(self):
    dsm = (f'DSM (continuous time, {"likelihood" if self.likelihood_weighting else "Score SDE"} weighting, '
           f'reduce_mean={self.reduce_mean})')
    return '; '.join([dsm] + [r.describe() for r in self.all_regularizers])

  def draw_noise(self, shape, device, dtype=torch.float32, generator=None):
    # t, then z: Score SDE's order, so that with the global generator the draws are Score SDE's.
    noise = {
        't': torch.rand(shape[0], generator=generator, device=device) * (self.sde.T - self.eps) + self.eps,
        'z': torch.randn(shape, generator=generator, device=device, dtype=dtype),
    }
    for r in self.regularizers:
      noise.update(r.draw_noise(shape, device, dtype, generator))
    return noise

  def perturb(self, batch, noise):
    """x_t ~ p_t(x_t | x0) for the batch, with the noise's t and z."""
    t, z = noise['t'], noise['z']
    mean, std = self.sde.marginal_prob(batch, t)
    return Perturbed(batch, t, z, std, mean + utils.expand_batch(std, batch) * z)

  def dsm_per_sample(self, score, perturbed):
    """The DSM loss of each sample, in float32 (`score` may come from an autocast region)."""
    score = utils.at_least_float32(score)
    z, std = utils.at_least_float32(perturbed.z), utils.at_least_float32(perturbed.std)
    if not self.likelihood_weighting:
      return _per_sample(torch.square(score * utils.expand_batch(std, score) + z), self.reduce_mean)
    g2 = utils.at_least_float32(self.sde.diffusion(perturbed.t)) ** 2
    return _per_sample(torch.square(score + z / utils.expand_batch(std, score)), self.reduce_mean) * g2

  def __call__(self, model, batch, train, noise=None, eager_model=None, regularize=True):
    if noise is None:
      noise = self.draw_noise(batch.shape, batch.device, batch.dtype)
    regularizers = self.regularizers if regularize else ()
    continuous_score = lambda m: mutils.get_score_fn(self.sde, m, train=train, continuous=True)
    score_fn = continuous_score(model)
    eager_score_fn = score_fn if eager_model is None else continuous_score(eager_model)
    p = self.perturb(batch, noise)
    shared = None
    if regularize and self._shared is not None:
      # One network evaluation at (x_t, t) serves the DSM loss and the regularizer on its first k samples
      # (and, by forward-mode AD, gives d_t s too); the rest of the batch is evaluated separately, so that
      # the higher-order derivatives run through the first k samples only.
      k = self._shared.num_samples(batch.shape[0])
      with torch.enable_grad():
        x_fp = utils.at_least_float32(p.x_t[:k].detach()).requires_grad_(True)
        evaluation = self._shared.evaluate(eager_score_fn, x_fp, p.t[:k])
      shared = (x_fp, evaluation)
      score = evaluation.s
      if k < batch.shape[0]:
        score = torch.cat([score, score_fn(p.x_t[k:], p.t[k:]).to(score.dtype)], dim=0)
    else:
      # Also a lazy step's DSM alone: the whole batch through `model`, which may be compiled.
      score = score_fn(p.x_t, p.t)
    terms = {'dsm': self.dsm_per_sample(score, p)}
    for r in regularizers:
      terms.update(r(eager_score_fn, p.x0, p.x_t, p.t, noise, shared=shared if r is self._shared else None,
                     create_graph=train))
    return terms


class SMLDLoss(Loss):
  """Score SDE's discrete-time SMLD (NCSN) loss for the VE SDE: noise levels drawn from its sigmas."""

  def __init__(self, vesde, reduce_mean=False):
    if not isinstance(vesde, VESDE):
      raise ValueError(f'SMLD training only works for VESDEs, not {type(vesde).__name__}.')
    self.sde = vesde
    self.reduce_mean = reduce_mean
    # Previous SMLD models assume descending sigmas
    self.smld_sigma_array = torch.flip(vesde.discrete_sigmas, dims=(0,))

  def draw_noise(self, shape, device, dtype=torch.float32, generator=None):
    return {'labels': torch.randint(0, self.sde.N, (shape[0],), generator=generator, device=device),
            'z': torch.randn(shape, generator=generator, device=device, dtype=dtype)}

  def __call__(self, model, batch, train, noise=None, eager_model=None, regularize=True):
    if noise is None:
      noise = self.draw_noise(batch.shape, batch.device, batch.dtype)
    model_fn = mutils.get_model_fn(model, train=train)
    labels = noise['labels']
    sigmas = self.smld_sigma_array.to(batch.device)[labels]
    perturbation = noise['z'] * utils.expand_batch(sigmas, batch)
    score = utils.at_least_float32(model_fn(perturbation + batch, labels))
    target = -perturbation / utils.expand_batch(sigmas ** 2, batch)
    return {'dsm': _per_sample(torch.square(score - target), self.reduce_mean) * sigmas ** 2}


class DDPMLoss(Loss):
  """Score SDE's discrete-time DDPM loss for the VP SDE: the noise prediction error at a random step."""

  def __init__(self, vpsde, reduce_mean=True):
    if not isinstance(vpsde, VPSDE):
      raise ValueError(f'DDPM training only works for VPSDEs, not {type(vpsde).__name__}.')
    self.sde = vpsde
    self.reduce_mean = reduce_mean

  def draw_noise(self, shape, device, dtype=torch.float32, generator=None):
    return {'labels': torch.randint(0, self.sde.N, (shape[0],), generator=generator, device=device),
            'z': torch.randn(shape, generator=generator, device=device, dtype=dtype)}

  def __call__(self, model, batch, train, noise=None, eager_model=None, regularize=True):
    if noise is None:
      noise = self.draw_noise(batch.shape, batch.device, batch.dtype)
    model_fn = mutils.get_model_fn(model, train=train)
    labels, z = noise['labels'], noise['z']
    sqrt_alphas_cumprod = self.sde.sqrt_alphas_cumprod.to(batch.device)
    sqrt_1m_alphas_cumprod = self.sde.sqrt_1m_alphas_cumprod.to(batch.device)
    perturbed_data = (utils.expand_batch(sqrt_alphas_cumprod[labels], batch) * batch +
                      utils.expand_batch(sqrt_1m_alphas_cumprod[labels], batch) * z)
    score = utils.at_least_float32(model_fn(perturbed_data, labels))
    return {'dsm': _per_sample(torch.square(score - z), self.reduce_mean)}


def _discrete_loss(sde, reduce_mean):
  """Score SDE's discrete (legacy) objectives: SMLD for VE, DDPM for VP; sub-VP has none."""
  if isinstance(sde, VESDE):
    return SMLDLoss(sde, reduce_mean=reduce_mean)
  if isinstance(sde, VPSDE):
    return DDPMLoss(sde, reduce_mean=reduce_mean)
  raise ValueError(f'Discrete training for {type(sde).__name__} is not recommended.')


def build_loss(sde, reduce_mean, continuous, likelihood_weighting, regularizers=()):
  """The loss object for these options (continuous: `SDELoss` with the regularizers; else SMLD/DDPM)."""
  if continuous:
    return SDELoss(sde, reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting,
                   regularizers=regularizers)
  if likelihood_weighting:
    raise ValueError('Likelihood weighting is not supported for original SMLD/DDPM training '
                     '(training.continuous=False).')
  active = [r for r in regularizers if r.active]
  if active:
    raise ValueError(f'{type(active[0]).__name__} ({active[0].describe()}) is not supported for original '
                     'SMLD/DDPM training (training.continuous=False); switch it off.')
  return _discrete_loss(sde, reduce_mean)


def loss_from_config(config, sde):
  """The training objective `config.training` describes (its fields validated as the module docstring says;
  `training.continuous` is passed on to the regularizers)."""
  continuous = utils.config_value(config, 'training.continuous')
  reduce_mean = utils.config_value(config, 'training.reduce_mean')
  likelihood_weighting = utils.config_value(config, 'training.likelihood_weighting')
  regularizers = [cls.from_config(config, sde, continuous=continuous) for cls in REGULARIZERS]
  return build_loss(sde, reduce_mean, continuous, likelihood_weighting, regularizers)


def check_optimize_fn(optimize_fn):
  """`optimize_fn`, or a ValueError if a training step was built without one."""
  if optimize_fn is None:
    raise ValueError('A training step needs optimize_fn (losses.optimization_manager(config)).')
  return optimize_fn


def apply_update(state, optimize_fn, **kwargs):
  """The update after the backward pass, on Score SDE's `state`: `optimize_fn` (learning rate, clipping,
  optimizer step; `kwargs` e.g. its `scaler`), then `state['step'] += 1` and the EMA update.

  Returns:
    `optimize_fn`'s gradient norm (None when clipping is disabled).
  """
  model = state['model']
  grad_norm = optimize_fn(state['optimizer'], model.parameters(), step=state['step'], **kwargs)
  state['step'] += 1
  state['ema'].update(model.parameters())
  return grad_norm


class LazyRegularization:
  """Lazy regularization (`training.fp_every`, as StyleGAN2's lazy R1 penalty): the regularizers' terms on one
  optimizer step in `every`, at `every` times their weight.

  The DSM term is computed at every step; the regularizers' terms only at the steps whose global step
  (`state['step']` before the update) is a multiple of `every`, with their weights multiplied by `every`, so that
  over `every` consecutive steps the expected gradient is the every-step one. The decision is a function of the
  global step only: every rank and micro-batch of a step agrees without communicating, and a resumed run
  computes the terms on the steps the uninterrupted run would have. `every = 1` is the paper's loss, bit for
  bit. Evaluation is not lazy: it reports the terms at weight 1.
  """

  def __init__(self, every=1):
    """Validates `every` (`training.fp_every`: an integer >= 1), here only."""
    self.every = utils.check_number('training.fp_every', every, low=1, integer=True)

  def regularizes(self, step):
    """Whether the optimizer step `step` (the global step, before its update) computes the regularizers."""
    return int(step) % self.every == 0

  def describe(self, loss):
    """One clause for the log, or '' when every step computes the terms (or the loss has none)."""
    if self.every == 1 or not loss.regularizer_term_names:
      return ''
    return (f'lazy regularization: {", ".join(loss.regularizer_term_names)} on the steps that are multiples of '
            f'training.fp_every={self.every}, at {self.every} x their weight; DSM at every step')


def _detached(terms):
  """A dict of tensors, detached."""
  return {name: value.detach() for name, value in terms.items()}


def eval_terms(state, terms_fn):
  """Score SDE's evaluation: `terms_fn(model)` (a dict of tensors, e.g. `Loss.terms`) with the EMA weights in
  `state['model']` and no parameter gradients (`models.ema.ema_weights`); returned detached."""
  with ema_lib.ema_weights(state), torch.no_grad():
    return _detached(terms_fn(state['model']))


def _legacy_terms(terms):
  """The dict of terms Score SDE-style functions return: 'loss', 'dsm', 'fp_vector', 'fp_scalar' (NaN when not
  computed), plus any other term the loss reports; values detached except 'loss'."""
  nan = torch.full((), float('nan'), device=terms['loss'].device)
  out = {'fp_vector': nan, 'fp_scalar': nan}
  out.update({name: value if name == 'loss' else value.detach() for name, value in terms.items()})
  return {name: out[name] for name in ('loss', 'dsm', 'fp_vector', 'fp_scalar', *out)}


def _score_sde_step_fn(loss, train, optimize_fn, return_terms, lazy=None):
  """Score SDE's `step_fn(state, batch)` for `loss`: float32, the whole batch at once, one process, the noise
  drawn from torch's global generator; `lazy` a `LazyRegularization` (default: every step). `trainer.Trainer`
  is the same step with the scale-out options."""
  lazy = lazy or LazyRegularization()

  def batch_terms(model, batch, train, regularize=True, regularizer_scale=1):
    return loss.terms(loss(model, batch, train, regularize=regularize), batch.shape[0],
                      regularizer_scale=regularizer_scale)

  def step_fn(state, batch):
    if train:
      check_optimize_fn(optimize_fn)  # before the state is touched
      state['optimizer'].zero_grad(set_to_none=True)
      terms = batch_terms(state['model'], batch, True, lazy.regularizes(state['step']), lazy.every)
      terms['loss'].backward()
      apply_update(state, optimize_fn)
      terms = _detached(terms)
    else:
      terms = eval_terms(state, lambda model: batch_terms(model, batch, False))
    return _legacy_terms(terms) if return_terms else terms['loss']

  return step_fn


def get_sde_loss_fn(sde, train, reduce_mean=True, continuous=True, likelihood_weighting=True, eps=1e-5,
                    return_terms=False, **fp_options):
  """Create a loss function for training with arbitrary SDEs: DSM, plus the score-FPE regularizer.

  A wrapper over `SDELoss` with Score SDE's signature (and FP-Diffusion's keyword arguments).

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    train: `True` for training loss and `False` for evaluation loss.
    reduce_mean: If `True`, average the loss across data dimensions. Otherwise sum the loss across data dimensions.
    continuous: `True` indicates that the model is defined to take continuous time steps. Otherwise it requires
      ad-hoc interpolation to take continuous time steps.
    likelihood_weighting: If `True`, weight the mixture of score matching losses
      according to https://arxiv.org/abs/2101.09258; otherwise use the weighting recommended in our paper.
    eps: A `float` number. The smallest time step to sample from.
    return_terms: if `True`, the loss function returns a dict: 'loss' (differentiable), 'dsm', 'fp_vector'
      (R_vec), 'fp_scalar' (R_sc); a term that is not computed is NaN.
    **fp_options: the score-FPE regularizer's options, `score_fpe.FP_OPTIONS` (names of the `config.training`
      fields, same defaults; validated by the constructors `ScoreFPERegularizer.from_options` calls), e.g.
      `alpha`, `beta` (weights of the vector and scalar terms; 0, the default, = not computed), `scalar_fp`,
      `fp_time_derivative`, `fp_divergence`, `fp_batch_fraction`, `fp_dropout_masks`. An unknown name raises
      TypeError.

  Returns:
    A loss function `loss_fn(model, batch, t=None, z=None)`; `t` (B,) and `z` (shape of batch) optionally fix
    the DSM's times and noise (for tests and diagnostics).
  """
  regularizer = score_fpe.ScoreFPERegularizer.from_options(sde, continuous=continuous, eps=eps, **fp_options)
  loss = SDELoss(sde, reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting, eps=eps,
                 regularizers=(regularizer,))

  def loss_fn(model, batch, t=None, z=None):
    """Compute the loss function.

    Args:
      model: A score model.
      batch: A mini-batch of training data.
      t, z: optional times and noise of the DSM (default: drawn here).

    Returns:
      loss: A scalar that represents the average loss value across the mini-batch (or the dict of terms).
    """
    noise = loss.draw_noise(batch.shape, batch.device, batch.dtype)
    if t is not None:
      noise['t'] = t
    if z is not None:
      noise['z'] = z
    terms = loss.terms(loss(model, batch, train, noise), batch.shape[0])
    return _legacy_terms(terms) if return_terms else terms['loss']

  return loss_fn


def _scalar_loss_fn(loss, train):
  def loss_fn(model, batch):
    return loss.terms(loss(model, batch, train), batch.shape[0])['loss']
  return loss_fn


def get_smld_loss_fn(vesde, train, reduce_mean=False):
  """Legacy code to reproduce previous results on SMLD(NCSN). Not recommended for new work."""
  return _scalar_loss_fn(SMLDLoss(vesde, reduce_mean=reduce_mean), train)


def get_ddpm_loss_fn(vpsde, train, reduce_mean=True):
  """Legacy code to reproduce previous results on DDPM. Not recommended for new work."""
  return _scalar_loss_fn(DDPMLoss(vpsde, reduce_mean=reduce_mean), train)


def get_step_fn(sde, train, optimize_fn=None, reduce_mean=False, continuous=True, likelihood_weighting=False,
                return_terms=False, **fp_options):
  """Create a one-step training/evaluation function.

  Score SDE's numerics: float32, one batch, one process, the noise from torch's global generator (for the
  scale-out options, `trainer.Trainer`).

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    optimize_fn: An optimization function.
    reduce_mean: If `True`, average the loss across data dimensions. Otherwise sum the loss across data dimensions.
    continuous: `True` indicates that the model is defined to take continuous time steps.
    likelihood_weighting: If `True`, weight the mixture of score matching losses according to
      https://arxiv.org/abs/2101.09258; otherwise use the weighting recommended by our paper.
    return_terms: if `True`, the step returns a dict of detached 0-dim tensors 'loss', 'dsm', 'fp_vector',
      'fp_scalar' (NaN for a term that is not computed) instead of the loss.
    **fp_options: the score-FPE regularizer's options, `score_fpe.FP_OPTIONS`, as in `get_sde_loss_fn`.

  Returns:
    A one-step function `step_fn(state, batch)` for training or evaluation.
  """
  regularizer = score_fpe.ScoreFPERegularizer.from_options(sde, continuous=continuous, **fp_options)
  loss = build_loss(sde, reduce_mean, continuous, likelihood_weighting, (regularizer,))
  return _score_sde_step_fn(loss, train, optimize_fn, return_terms)


def step_fn_from_config(config, sde, train, optimize_fn=None, return_terms=False):
  """The step function that `config.training` describes (`loss_from_config`, and for training the lazy
  regularization `training.fp_every`), Score SDE's numerics.

  Args:
    config: the experiment's config.
    sde: the forward SDE (`sde_lib.sde_from_config(config)`).
    train: `True` for the training step, `False` for the evaluation step.
    optimize_fn: `optimization_manager(config)` for training.
    return_terms: see `get_step_fn`.

  Returns:
    `step_fn(state, batch)`.
  """
  lazy = None
  if train:
    check_optimize_fn(optimize_fn)
    lazy = LazyRegularization(config.training.fp_every)
  return _score_sde_step_fn(loss_from_config(config, sde), train, optimize_fn, return_terms, lazy)
