"""The score Fokker-Planck equation (score FPE) and its residuals (FP-Diffusion, Lai et al., ICML 2023).

For a forward SDE dx = f(x, t) dt + g(t) dw with marginals p_t, the score s = grad_x log p_t satisfies

  d_t s = grad_x Phi,   Phi(x, t) = 1/2 g(t)^2 [div_x s + |s|^2] - <f, s> - div_x f

(the gradient of the log-density form of the Fokker-Planck equation). For a score model s(x, t) this module
computes, once for every SDE and in terms of `sde.drift`, `sde.diffusion` and `sde.drift_divergence` only:

  - the vector residual r = d_t s - grad_x Phi (shape of x), zero for the true score;
  - the scalar term 1/2 g^2 [div_x s + |s|^2] - <f, s> (shape (B,)), which is what FP-Diffusion's released
    code penalizes as its "scalar" FPE (no time derivative and no div_x f; see docs/score_fpe.md).

Estimators (chosen in `ScoreFPE`):
  - d_t s: a second-order three-point finite difference whose nodes always stay inside [eps, T], or the exact
    derivative by forward-mode AD in t (one dual evaluation gives s and d_t s together);
  - div_x s: Hutchinson's estimator (Gaussian or Rademacher probes, differentiable again in x), or the exact
    trace of the Jacobian (D backward passes: small D only).

Conservativity (FP-Diffusion's second claim: the regularized score is closer to a gradient field) is measured
by `conservativity`, the relative asymmetry ||J - J^T||_F / ||J||_F of the score's Jacobian J in x, exactly
or from Rademacher probes, and by `conservativity_vs_time` on the same x_t as `residual_vs_time`.

The regularizer's options (`FP_OPTIONS`) are read by this module only, and each is checked once, by the
constructor that consumes it; a field that other modules read too has its rule in `utils.CONFIG_FIELDS`,
applied by `utils.config_value` wherever it is read.

A score function is `score_fn(x, t)` with x of any shape (B, ...) and t of shape (B,), returning the score,
shape of x. Everything here is differentiable (to the order the loss needs) with respect to the score
function's parameters.
"""

import collections
import contextlib
import difflib
import logging
import math
import os

import numpy as np
import torch

import utils

TIME_DERIVATIVES = ('finite_difference', 'forward_ad')
DIVERGENCES = ('hutchinson', 'exact')
HUTCHINSON_TYPES = ('gaussian', 'rademacher')
# Dropout masks of the finite difference's three evaluations: 'shared' replays the random state of the
# evaluation at t for the two others (the derivative of one network); 'independent' draws new masks for each,
# as the released code does (the difference of two dropout draws divided by ~1e-3: docs/score_fpe.md).
DROPOUT_MASKS = ('shared', 'independent')
FP_WEIGHTINGS = ('constant', 'convention', 'll')


def _grad(output, x, grad_outputs, create_graph):
  """d<output, grad_outputs>/dx; zeros (not an error) where `output` does not depend on x."""
  (grad,) = torch.autograd.grad(output, x, grad_outputs=grad_outputs, create_graph=create_graph,
                                retain_graph=True, allow_unused=True)
  return torch.zeros_like(x) if grad is None else grad


def hutchinson_probe(x, hutchinson_type='gaussian', generator=None):
  """A probe v with E[v v^T] = I, shape of x: standard Gaussian, or Rademacher (+-1 with equal odds)."""
  if hutchinson_type == 'gaussian':
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
  if hutchinson_type == 'rademacher':
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return bits.to(x.dtype) * 2 - 1
  raise ValueError(f'hutchinson_type={hutchinson_type!r}; choose one of {HUTCHINSON_TYPES!r}.')


def hutchinson_divergence(s, x, num_probes=1, hutchinson_type='gaussian', create_graph=True, generator=None,
                          probes=None):
  """Hutchinson's unbiased estimate of div_x s = tr(ds/dx): the mean over probes v of v^T (ds/dx) v.

  Args:
    s: the score s(x), computed from x (which requires grad), shape (B, ...).
    x: the input, shape (B, ...).
    num_probes: number of independent probes per sample.
    hutchinson_type: 'gaussian' or 'rademacher'.
    create_graph: keep the graph, so the estimate is differentiable again (in x and in parameters).
    generator: optional `torch.Generator` for the probes.
    probes: optional probes drawn beforehand (`draw_probes`), shape (B, num_probes, ...); then `generator` and
      `hutchinson_type` are not used.

  Returns:
    The estimate, shape (B,).
  """
  if probes is None:
    probes = draw_probes(x.shape, num_probes, hutchinson_type, generator, x.device, x.dtype)
  total = 0.
  for i in range(probes.shape[1]):
    v = probes[:, i].to(x.dtype)
    total = total + utils.sum_except_batch(_grad(s, x, v, create_graph) * v)
  return total / probes.shape[1]


def draw_probes(shape, num_probes, hutchinson_type='gaussian', generator=None, device=None, dtype=torch.float32):
  """`num_probes` Hutchinson probes per sample for data of `shape` (B, ...): shape (B, num_probes, ...).

  The sample axis comes first, so that the probes of a batch can be drawn once and split with the batch (over
  ranks or micro-batches) as its times and noise are.
  """
  probe_shape = (shape[0], num_probes) + tuple(shape[1:])
  template = torch.empty(probe_shape, device=device, dtype=dtype)
  return hutchinson_probe(template, hutchinson_type, generator)


def exact_divergence(s, x, create_graph=True):
  """div_x s = tr(ds/dx) exactly, by one backward pass per dimension (D passes: small D only).

  Args:
    s: the score s(x), computed from x (which requires grad), shape (B, ...).
    x: the input, shape (B, ...).
    create_graph: keep the graph, so the divergence is differentiable again.

  Returns:
    div_x s, shape (B,).
  """
  s_flat = s.reshape(s.shape[0], -1)
  div = 0.
  for i in range(s_flat.shape[1]):
    unit = torch.zeros_like(s_flat)
    unit[:, i] = 1.
    div = div + _grad(s, x, unit.reshape(s.shape), create_graph).reshape(s.shape[0], -1)[:, i]
  return div


def finite_difference_nodes(t, hs, hd, eps, T):
  """Offsets (a, b) of the three-point stencil {t + a, t, t + b} used for d_t s, per sample.

  The released code always uses {t - hs, t, t + hd}, which leaves [0, T] for t < hs (and gives NaN for the VP
  SDE, whose std is imaginary at t < 0). Here the stencil is {t - hs, t, t + hd} where it fits in [eps, T];
  one-sided {t, t + hd, t + hd + hs} near eps and {t - hs - hd, t - hs, t} near T, both still second order.
  The offsets are measured after rounding t + a, t + b to t's dtype, so the weights match the times
  actually evaluated.

  Returns:
    (t_a, a, t_b, b): the evaluated times and their offsets from t, each shape (B,).
  """
  near_low = t - hs < eps
  near_high = t + hd > T
  a = torch.where(near_low, torch.full_like(t, hd), torch.full_like(t, -hs))
  b = torch.where(near_low, torch.full_like(t, hd + hs), torch.full_like(t, hd))
  a = torch.where(near_high & ~near_low, torch.full_like(t, -hs - hd), a)
  b = torch.where(near_high & ~near_low, torch.full_like(t, -hs), b)
  t_a = (t + a).clamp(eps, T)
  t_b = (t + b).clamp(eps, T)
  return t_a, t_a - t, t_b, t_b - t


def finite_difference_weights(a, b):
  """Weights (w_a, w_0, w_b) of the three-point derivative at t from values at t + a, t, t + b.

  They are the derivatives at t of the Lagrange basis polynomials; with a = -hs, b = hd they give the
  released code's [hs^2 s(t+hd) + (hd^2 - hs^2) s(t) - hd^2 s(t-hs)] / [hs hd (hs + hd)].
  """
  w_a = b / (a * (b - a))
  w_0 = -(a + b) / (a * b)
  w_b = -a / (b * (b - a))
  return w_a, w_0, w_b


def capture_rng_state(device):
  """The state of the random generators a network evaluation on `device` may draw from (e.g. dropout)."""
  cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
  return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(rng_state, device):
  """Runs the body with the random generators set to `rng_state`, then puts back their current state.

  Evaluating s(x, t + a) with the same random state as s(x, t) gives it the same dropout masks; otherwise the
  finite difference would divide the difference of two dropout draws by a step of ~1e-3.
  """
  if rng_state is None:
    yield
    return
  current = capture_rng_state(device)
  torch.set_rng_state(rng_state[0])
  if rng_state[1] is not None:
    torch.cuda.set_rng_state(rng_state[1], device)
  try:
    yield
  finally:
    torch.set_rng_state(current[0])
    if current[1] is not None:
      torch.cuda.set_rng_state(current[1], device)


def finite_difference_time_derivative(score_fn, x, t, s=None, hs=1e-3, hd=5e-4, eps=1e-5, T=1., rng_state=None):
  """d_t s(x, t) by a second-order three-point finite difference with all times inside [eps, T].

  Args:
    score_fn: `score_fn(x, t)`.
    x: points, shape (B, ...).
    t: times, shape (B,).
    s: `score_fn(x, t)` if already computed (it is reused, so this costs two network evaluations).
    hs, hd: the backward and forward steps.
    eps, T: the time interval the score function may be evaluated on.
    rng_state: the random state `s` was evaluated with (`capture_rng_state`), replayed for the two other
      evaluations so that a model in training mode uses the same dropout masks for all three.

  Returns:
    The estimate of d_t s, shape of x.
  """
  t_a, a, t_b, b = finite_difference_nodes(t, hs, hd, eps, T)
  w_a, w_0, w_b = finite_difference_weights(a, b)
  if s is None:
    rng_state = capture_rng_state(x.device)
    s = score_fn(x, t)
  with replayed_rng(rng_state, x.device):
    s_a = score_fn(x, t_a)
  with replayed_rng(rng_state, x.device):
    s_b = score_fn(x, t_b)
  return utils.expand_batch(w_a, x) * s_a + utils.expand_batch(w_0, x) * s + utils.expand_batch(w_b, x) * s_b


def score_and_time_derivative(score_fn, x, t):
  """s(x, t) and its exact time derivative d_t s(x, t), from one forward-mode evaluation in t.

  `torch.func.jvp` is used rather than `torch.autograd.forward_ad` dual tensors: with the latter, reverse mode
  through softmax's forward-mode formula fails (an in-place update of its saved exp), which breaks the
  attention blocks of NCSN++/DDPM++. The outputs keep their reverse-mode graph (reverse-over-forward), so
  both can be differentiated in x and in the parameters. The score function must be differentiable in t
  (continuous-time models).

  Returns:
    (s, dsdt), each of the shape of x.
  """
  return torch.func.jvp(lambda time: score_fn(x, time), (t,), (torch.ones_like(t),))


def _fp_weighting(fp_wgt_type):
  # The one rule of the regularizer's option and of `fp_time_weight`'s argument (which scripts pass directly).
  return utils.check_choice('training.fp_wgt_type', fp_wgt_type, FP_WEIGHTINGS)


def fp_time_weight(sde, t, fp_wgt_type):
  """lambda(t) of the vector term: 1 ('constant'), g(t) ('convention') or g(t)^2 ('ll'); shape (B,)."""
  _fp_weighting(fp_wgt_type)
  if fp_wgt_type == 'constant':
    return torch.ones_like(t)
  g = sde.diffusion(t)
  return g if fp_wgt_type == 'convention' else g ** 2


def per_sample_vector_term(r, m):
  """|r|_2^m / D^m per sample (shape (B,)), the vector term before lambda(t) and the batch mean."""
  r_flat = r.reshape(r.shape[0], -1)
  if m == 2:
    # Sum of squares rather than norm ** 2: smooth where r = 0 (the norm's gradient is not).
    power = r_flat.square().sum(dim=1)
  else:
    power = torch.linalg.vector_norm(r_flat, dim=1) ** m
  return power / float(r_flat.shape[1]) ** m


# One network evaluation at (x, t): the score, d_t s where forward-mode AD gave it (else None), and the random
# state it was drawn with (replayed by the finite difference).
ScoreEvaluation = collections.namedtuple('ScoreEvaluation', ['s', 'dsdt', 'rng_state'])


class ScoreFPE:
  """Residuals of the score FPE for one SDE, with a choice of estimators.

  Usage: `ev = fpe.evaluate_score(score_fn, x, t, with_time_derivative)` (x must require grad), then
  `fpe.residuals(score_fn, x, t, ev, ...)`. The two steps are separate so that the DSM loss can use `ev.s`,
  sharing the network evaluation at (x_t, t).
  """

  def __init__(self, sde, eps=1e-5, time_derivative='finite_difference', fd_hs=1e-3, fd_hd=5e-4,
               divergence='hutchinson', hutchinson_type='gaussian', num_probes=1, dropout_masks='shared'):
    """Builds the estimator; arguments are validated here, once (errors name the matching `config.training`
    field, the `FP_OPTIONS` name of the keyword with 'fp_' in front).

    Args:
      sde: an `sde_lib.SDE`.
      eps: the smallest time the score function may be evaluated at (the finite difference stays >= eps).
      time_derivative: 'finite_difference' or 'forward_ad'.
      fd_hs, fd_hd: backward and forward steps of the finite difference, in (0, 0.05].
      divergence: 'hutchinson' or 'exact'.
      hutchinson_type: 'gaussian' or 'rademacher'.
      num_probes: Hutchinson probes per sample (>= 1).
      dropout_masks: 'shared' (the finite difference's three evaluations use one set of dropout masks) or
        'independent' (new masks for each, as released; finite difference only).
    """
    self.sde = sde
    self.eps = sde.check_eps(eps)
    self.time_derivative = utils.check_choice('training.fp_time_derivative', time_derivative,
                                              TIME_DERIVATIVES)
    # Steps of at most 0.05 keep the one-sided stencils (span hs + hd) inside [eps, T].
    self.fd_hs = utils.check_number('training.fp_fd_hs', fd_hs, low=0., high=0.05, low_open=True)
    self.fd_hd = utils.check_number('training.fp_fd_hd', fd_hd, low=0., high=0.05, low_open=True)
    self.divergence = utils.check_choice('training.fp_divergence', divergence, DIVERGENCES)
    self.hutchinson_type = utils.check_choice('training.fp_hutchinson_type', hutchinson_type,
                                              HUTCHINSON_TYPES)
    self.num_probes = utils.check_number('training.fp_num_probes', num_probes, low=1, integer=True)
    self.dropout_masks = utils.check_choice('training.fp_dropout_masks', dropout_masks, DROPOUT_MASKS)
    if dropout_masks == 'independent' and time_derivative != 'finite_difference':
      # Forward-mode AD evaluates the network once: there is nothing to draw independently.
      raise ValueError(f"config.training.fp_dropout_masks='independent' (the released finite difference's "
                       f"masks) needs config.training.fp_time_derivative='finite_difference', not "
                       f"{time_derivative!r}.")

  def evaluate_score(self, score_fn, x, t, with_time_derivative=True):
    """One network evaluation at (x, t): a `ScoreEvaluation` (d_t s only by forward-mode AD)."""
    if with_time_derivative and self.time_derivative == 'forward_ad':
      return ScoreEvaluation(*score_and_time_derivative(score_fn, x, t), None)
    # Without a captured state, the finite difference's other two evaluations draw their own dropout masks.
    replay = with_time_derivative and self.dropout_masks == 'shared'
    rng_state = capture_rng_state(x.device) if replay else None
    return ScoreEvaluation(score_fn(x, t), None, rng_state)

  def divergence_of(self, s, x, create_graph=True, generator=None, probes=None):
    """div_x s by the chosen estimator, shape (B,); `probes` as `hutchinson_divergence`'s."""
    if self.divergence == 'exact':
      return exact_divergence(s, x, create_graph=create_graph)
    return hutchinson_divergence(s, x, self.num_probes, self.hutchinson_type, create_graph=create_graph,
                                 generator=generator, probes=probes)

  def draw_probes(self, shape, generator=None, device=None, dtype=torch.float32):
    """The Hutchinson probes `residuals` would draw for data of `shape`, or None for the exact divergence."""
    if self.divergence == 'exact':
      return None
    return draw_probes(shape, self.num_probes, self.hutchinson_type, generator, device, dtype)

  def time_derivative_of(self, score_fn, x, t, evaluation):
    """d_t s at (x, t) by the chosen estimator, reusing `evaluation` where it can."""
    if evaluation.dsdt is not None:
      return evaluation.dsdt
    if self.time_derivative == 'forward_ad':
      return score_and_time_derivative(score_fn, x, t)[1]
    return finite_difference_time_derivative(score_fn, x, t, s=evaluation.s, hs=self.fd_hs, hd=self.fd_hd,
                                             eps=self.eps, T=self.sde.T, rng_state=evaluation.rng_state)

  def residuals(self, score_fn, x, t, evaluation, vector=True, scalar=True, create_graph=True, generator=None,
                probes=None):
    """The score-FPE residuals at (x, t).

    Args:
      score_fn: `score_fn(x, t)`.
      x: points, shape (B, ...), requiring grad.
      t: times, shape (B,).
      evaluation: `evaluate_score(score_fn, x, t, with_time_derivative=vector)`.
      vector: compute the vector residual r = d_t s - grad_x Phi.
      scalar: return the scalar term 1/2 g^2 [div s + |s|^2] - <f, s>.
      create_graph: keep the graph for parameter gradients (True when training).
      generator: optional `torch.Generator` for Hutchinson probes.
      probes: optional Hutchinson probes drawn beforehand (`draw_probes`), shape (B, num_probes, ...).

    Returns:
      A dict with 'scalar' (shape (B,)) if `scalar`, and 'vector' (shape of x) and 'time_derivative'
      (d_t s) if `vector`.
    """
    out = {}
    if not (vector or scalar):
      return out
    s = evaluation.s
    g2 = self.sde.diffusion(t) ** 2
    # The vector residual differentiates div s again in x, so its graph is needed even without create_graph.
    div_s = self.divergence_of(s, x, create_graph=create_graph or vector, generator=generator, probes=probes)
    f = self.sde.drift(x, t)
    scalar_term = 0.5 * g2 * (div_s + utils.sum_except_batch(s ** 2)) - utils.sum_except_batch(f * s)
    if scalar:
      out['scalar'] = scalar_term
    if vector:
      phi = scalar_term - self.sde.drift_divergence(x, t)
      grad_phi = _grad(phi.sum(), x, None, create_graph)
      dsdt = self.time_derivative_of(score_fn, x, t, evaluation)
      out['vector'] = dsdt - grad_phi
      out['time_derivative'] = dsdt
    return out


def score_fpe_residuals(score_fn, sde, x, t, vector=True, scalar=True, create_graph=False, generator=None,
                        **estimator_kwargs):
  """The score-FPE residuals of `score_fn` at (x, t), evaluating the score itself (see `ScoreFPE.residuals`).

  Args:
    estimator_kwargs: keyword arguments of `ScoreFPE` (eps, time_derivative, fd_hs, fd_hd, divergence,
      hutchinson_type, num_probes).

  Returns:
    The dict of `ScoreFPE.residuals`, plus 'score'.
  """
  fpe = ScoreFPE(sde, **estimator_kwargs)
  with torch.enable_grad():
    x = x.detach().requires_grad_(True)
    evaluation = fpe.evaluate_score(score_fn, x, t, with_time_derivative=vector)
    out = fpe.residuals(score_fn, x, t, evaluation, vector=vector, scalar=scalar, create_graph=create_graph,
                        generator=generator)
  out['score'] = evaluation.s
  return out


def residual_vs_time(score_fn, sde, x0, ts, fpe=None, fp_wgt_type='ll', m=2, batch_size=None, generator=None):
  """The score-FPE residual of `score_fn` as a function of t: the paper's diagnostic.

  For each t in `ts`, draws x_t ~ p_t(x_t | x0) (one sample per row of x0, noise from `generator`) and
  evaluates the residuals there, without parameter gradients. Returned quantities, per t:
    - 'residual': RMS per dimension of the vector residual, sqrt(mean over samples and dimensions of r^2);
    - 'residual_weighted': the loss's vector term at that t, mean over samples of lambda(t) |r|^m / D^m;
    - 'scalar': RMS over samples of the scalar term 1/2 g^2 [div s + |s|^2] - <f, s>;
    - 'time_derivative': RMS per dimension of d_t s (the scale against which 'residual' is small or not).

  Args:
    score_fn: `score_fn(x, t)`, e.g. `models.utils.get_score_fn(sde, model, train=False, continuous=True)`.
    sde: an `sde_lib.SDE`.
    x0: clean data, shape (N, ...).
    ts: times, a 1-D sequence in [eps, T].
    fpe: a `ScoreFPE` (default: forward-mode AD for d_t s, one Gaussian Hutchinson probe).
    fp_wgt_type, m: lambda(t) and the power of 'residual_weighted', as in the loss.
    batch_size: evaluate x0 in chunks of this many samples (default: all at once).
    generator: optional `torch.Generator` for the noise and the probes (same noise for every t if seeded).

  Returns:
    A dict of float64 numpy arrays of shape (len(ts),): 't', 'residual', 'residual_weighted', 'scalar',
    'time_derivative'.
  """
  if fpe is None:
    fpe = ScoreFPE(sde, eps=min(float(np.min(ts)), sde.sampling_eps), time_derivative='forward_ad')
  ts = np.asarray(ts, dtype=np.float64).reshape(-1)
  n = x0.shape[0]
  names = ('residual', 'residual_weighted', 'scalar', 'time_derivative')
  out = {name: np.zeros(len(ts)) for name in names}
  D = utils.data_dim(x0)
  for i, t_value in enumerate(ts):
    sums = dict.fromkeys(names, 0.)
    for x_t, t in perturbed_batches(sde, x0, t_value, batch_size, generator):
      with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        evaluation = fpe.evaluate_score(score_fn, x_t, t, with_time_derivative=True)
        res = fpe.residuals(score_fn, x_t, t, evaluation, create_graph=False, generator=generator)
      r = res['vector'].detach()
      lam = fp_time_weight(sde, t, fp_wgt_type)
      sums['residual'] += r.square().sum().item()
      sums['residual_weighted'] += (lam * per_sample_vector_term(r, m)).sum().item()
      sums['scalar'] += res['scalar'].detach().square().sum().item()
      sums['time_derivative'] += res['time_derivative'].detach().square().sum().item()
    out['residual'][i] = math.sqrt(sums['residual'] / (n * D))
    out['residual_weighted'][i] = sums['residual_weighted'] / n
    out['scalar'][i] = math.sqrt(sums['scalar'] / n)
    out['time_derivative'][i] = math.sqrt(sums['time_derivative'] / (n * D))
    logging.debug('score-FPE residual at t=%.4g: %.4g', t_value, out['residual'][i])
  out['t'] = ts
  return out


def perturbed_batches(sde, x0, t_value, batch_size=None, generator=None):
  """Yields (x_t, t) chunk by chunk: x_t ~ p_t(x_t | x0) at the single time `t_value`, one sample per row of x0.

  The noise of a chunk is drawn from `generator` only when the chunk is reached, so a caller that draws its own
  random numbers (probes) from the same generator between chunks gets a reproducible interleaving.

  Args:
    sde: an `sde_lib.SDE`.
    x0: clean data, shape (N, ...).
    t_value: the time, a float.
    batch_size: chunk size (default: all N at once).
    generator: optional `torch.Generator` for the noise.
  """
  n = x0.shape[0]
  batch_size = n if batch_size is None else batch_size
  for start in range(0, n, batch_size):
    x0_chunk = x0[start:start + batch_size]
    t = torch.full((x0_chunk.shape[0],), t_value, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0_chunk, t)
    z = torch.randn(x0_chunk.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    yield mean + utils.expand_batch(std, x0_chunk) * z, t


def jacobian_asymmetry_exact(s, x):
  """Per-sample squared Frobenius norms of J - J^T and of J, J = ds/dx, from the full Jacobian (D passes).

  Args:
    s: the score s(x), computed from x (which requires grad), shape (B, ...).
    x: the input, shape (B, ...).

  Returns:
    (||J - J^T||_F^2, ||J||_F^2), each of shape (B,).
  """
  s_flat = s.reshape(s.shape[0], -1)
  rows = []
  for i in range(s_flat.shape[1]):
    unit = torch.zeros_like(s_flat)
    unit[:, i] = 1.
    rows.append(_grad(s, x, unit.reshape(s.shape), False).reshape(s.shape[0], -1))
  jac = torch.stack(rows, dim=1)  # (B, D, D): jac[b, i, j] = d s_i / d x_j of sample b
  asym = jac - jac.transpose(1, 2)
  return asym.square().sum(dim=(1, 2)), jac.square().sum(dim=(1, 2))


def jacobian_asymmetry_probes(s, x, num_probes, generator=None):
  """Unbiased estimates of ||J - J^T||_F^2 and ||J||_F^2 per sample, J = ds/dx, from Rademacher probes.

  For a probe v with E[v v^T] = I, E|A v|^2 = ||A||_F^2 for any matrix A; with A = J - J^T this is
  |J v - J^T v|^2. J^T v is one vector-Jacobian product; J v comes from the double-backward trick: u -> J^T u
  is linear in a dummy cotangent u, so the gradient of <J^T u, v> with respect to u is J v. Each probe costs
  two backward passes and one double backward.

  Args:
    s: the score s(x), computed from x (which requires grad), shape (B, ...).
    x: the input, shape (B, ...).
    num_probes: probes per sample (>= 1).
    generator: optional `torch.Generator` for the probes.

  Returns:
    (estimate of ||J - J^T||_F^2, estimate of ||J||_F^2), each of shape (B,), averaged over the probes.
  """
  probes = draw_probes(x.shape, num_probes, 'rademacher', generator, x.device, x.dtype)
  asym, norm = 0., 0.
  for i in range(num_probes):
    v = probes[:, i]
    jtv = _grad(s, x, v, False)
    u = torch.zeros_like(s, requires_grad=True)
    jtu = _grad(s, x, u, True)
    if jtu.requires_grad:
      (jv,) = torch.autograd.grad(jtu, u, grad_outputs=v, allow_unused=True)
      jv = torch.zeros_like(s) if jv is None else jv
    else:  # s does not depend on x: J = 0
      jv = torch.zeros_like(s)
    asym = asym + utils.sum_except_batch((jv - jtv).square())
    norm = norm + utils.sum_except_batch(jv.square())
  return asym / num_probes, norm / num_probes


def conservativity(score_fn, x, t, num_probes=0, generator=None):
  """The relative asymmetry ||J - J^T||_F / ||J||_F of the score's Jacobian J = d score / dx, per sample.

  A vector field is a gradient field (conservative) exactly where its Jacobian is symmetric, so this is zero for
  any true score, grad_x log p_t, and measures how far a learned score is from one (FP-Diffusion's second
  claim). It is scale-free (the same for s and c s) and lies in [0, 2]: 2 for an antisymmetric J (a rotation),
  about sqrt(2) for a matrix of independent entries. Where J = 0 (a constant field, the gradient of a linear
  potential) it is 0.

  Args:
    score_fn: `score_fn(x, t)` returning the score, shape of x. Samples must not interact (J is taken per
      sample: the cross-sample blocks of the batch Jacobian are assumed zero, as for any network in eval mode).
    x: points, shape (B, ...); each sample is flattened to D dimensions.
    t: times, shape (B,).
    num_probes: 0 for the exact Jacobian (D backward passes and a (B, D, D) tensor: small D only); k > 0 for k
      Rademacher probes per sample. The probe estimates of both squared norms are unbiased; their ratio (and
      its square root) is consistent, not unbiased: it converges to the exact value as k grows.
    generator: optional `torch.Generator` for the probes.

  Returns:
    A float tensor of shape (B,), detached (an evaluation metric: no graph is kept).
  """
  num_probes = utils.check_number('num_probes', num_probes, low=0, integer=True)  # 0: the exact Jacobian
  with torch.enable_grad():
    x = x.detach().requires_grad_(True)
    s = score_fn(x, t)
    if num_probes == 0:
      asym, norm = jacobian_asymmetry_exact(s, x)
    else:
      asym, norm = jacobian_asymmetry_probes(s, x, num_probes, generator)
  asym, norm = asym.detach(), norm.detach()
  ratio = torch.sqrt(asym / torch.where(norm > 0, norm, torch.ones_like(norm)))
  return torch.where(norm > 0, ratio, torch.zeros_like(ratio))


def conservativity_vs_time(score_fn, sde, x0, ts, num_probes=0, batch_size=None, generator=None):
  """The score's relative Jacobian asymmetry (`conservativity`) as a function of t, mean over samples.

  For each t in `ts`, draws x_t ~ p_t(x_t | x0) exactly as `residual_vs_time` does (`perturbed_batches`) and
  averages `conservativity(score_fn, x_t, t)` over the samples.

  Args:
    score_fn: `score_fn(x, t)`, e.g. `models.utils.get_score_fn(sde, model, train=False, continuous=True)`.
    sde: an `sde_lib.SDE`.
    x0: clean data, shape (N, ...).
    ts: times, a 1-D sequence in [eps, T].
    num_probes: as in `conservativity` (0: exact), which validates it.
    batch_size: evaluate x0 in chunks of this many samples (default: all at once).
    generator: optional `torch.Generator` for the noise and the probes.

  Returns:
    A float64 numpy array of shape (len(ts),).
  """
  ts = np.asarray(ts, dtype=np.float64).reshape(-1)
  out = np.zeros(len(ts))
  for i, t_value in enumerate(ts):
    total = 0.
    for x_t, t in perturbed_batches(sde, x0, t_value, batch_size, generator):
      total += conservativity(score_fn, x_t, t, num_probes, generator).sum().item()
    out[i] = total / x0.shape[0]
    logging.debug('score conservativity (relative Jacobian asymmetry) at t=%.4g: %.4g', t_value, out[i])
  return out


# The score-FPE regularizer's options, defined here once: name -> default. A name is at the same time the
# `config.training` field (`ScoreFPERegularizer.from_config` reads exactly these) and the keyword of the Score
# SDE-style wrappers (`losses.get_sde_loss_fn`, `losses.get_step_fn`). The estimator's options set the `ScoreFPE`
# keyword of their name without 'fp_'; the others set the `ScoreFPERegularizer` keyword of their name. Each is
# validated once, by the constructor that consumes it. A new option: one entry here, one keyword there.
ESTIMATOR_OPTIONS = collections.OrderedDict([
    ('fp_time_derivative', 'finite_difference'),
    ('fp_fd_hs', 1e-3),
    ('fp_fd_hd', 5e-4),
    ('fp_divergence', 'hutchinson'),
    ('fp_hutchinson_type', 'gaussian'),
    ('fp_num_probes', 1),
    ('fp_dropout_masks', 'shared'),
])
REGULARIZER_OPTIONS = collections.OrderedDict([
    ('scalar_fp', 'both'),
    ('fp_dist', 'pert'),
    ('fp_wgt_type', 'll'),
    ('alpha', 0.),
    ('beta', 0.),
    ('m', 2),
    ('fp_batch_fraction', 1.),
])
FP_OPTIONS = collections.OrderedDict([*REGULARIZER_OPTIONS.items(), *ESTIMATOR_OPTIONS.items()])


def check_fp_option_names(options):
  """Raises TypeError for a name of `options` that is not in `FP_OPTIONS`, with the closest one if any."""
  for name in options:
    if name not in FP_OPTIONS:
      close = difflib.get_close_matches(name, FP_OPTIONS, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise TypeError(f'Unknown score-FPE option {name!r}.{hint} The options (config.training fields of the same '
                      f'names) are: {", ".join(FP_OPTIONS)}.')


def fp_options_from_config(config):
  """The `FP_OPTIONS` fields of `config.training`, by name (not validated: their constructors do that)."""
  return {name: getattr(config.training, name) for name in FP_OPTIONS}


def fpe_from_options(sde, eps=1e-5, **options):
  """The `ScoreFPE` estimator of FP options (names and defaults: `FP_OPTIONS`; the regularizer's are ignored).

  Raises:
    TypeError: for a name not in `FP_OPTIONS`. The values are validated by `ScoreFPE`.
  """
  check_fp_option_names(options)
  return ScoreFPE(sde, eps=eps, **{name[len('fp_'):]: options.get(name, default)
                                   for name, default in ESTIMATOR_OPTIONS.items()})


def fpe_from_config(config, sde, eps=1e-5):
  """The `ScoreFPE` estimator that `config.training`'s fields describe (validated by `ScoreFPE`)."""
  return fpe_from_options(sde, eps=eps, **fp_options_from_config(config))


SCALAR_FP = ('False', 'True', 'both')
# The largest weight `training.alpha` and `training.beta` take. The recipes use 0.001 to 0.15; the loss is
# DSM + weight x residual in float32, whose 24-bit mantissa drops the DSM term once the weighted residual
# exceeds it about 1.7e7 times, and a weight of 1e30 overflows the first gradient (a FloatingPointError that
# looked like a learning-rate problem): above this bound the run would no longer train a score model.
MAX_FP_WEIGHT = 1e6
FP_DISTS = ('pert', 'x', 'random')


def fp_recipes():
  """The FP-Diffusion fine-tuning configs shipped in `configs/fp/`, as paths from the repository root."""
  folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'fp')
  names = os.listdir(folder) if os.path.isdir(folder) else ()
  return tuple(sorted(f'configs/fp/{name}' for name in names
                      if name.endswith('.py') and name not in ('fp_finetuning.py', '__init__.py')))


class ScoreFPERegularizer:
  """FP-Diffusion's regularizer as loss terms: `alpha R_vec + beta R_sc` (docs/score_fpe.md).

  A regularizer of `losses.SDELoss`: built once (every field validated here, and nowhere else), it reports per
  sample the terms it computes, by name, and says how the loss reduces and weighs them:
    - 'fp_vector': lambda(t) |r|_2^m / D^m, r the vector residual; reduced by the mean over the FP samples;
    - 'fp_scalar': the scalar term 1/2 g^2 [div s + |s|^2] - <f, s>; reduced as the released code does, by
      the L2 norm over the batch ('norm': rescaled by sqrt(B / k) when computed on k of the B samples).
  A term with weight 0 (or switched off by `scalar_fp`) is neither computed nor reported.

  Precision: everything here runs in float32 with autocast off, whatever `training.mixed_precision` says: the
  finite difference divides differences of scores by steps of about 1e-3, which in bfloat16 (3 significant
  digits) would be rounding noise, and the divergence and grad_x Phi are second derivatives.
  """

  reductions = {'fp_vector': 'mean', 'fp_scalar': 'norm'}

  def __init__(self, sde, fpe, *, scalar_fp='both', fp_dist='pert', fp_wgt_type='ll', alpha=0., beta=0., m=2,
               fp_batch_fraction=1., continuous=True):
    """Validates the options (here only: `from_options` passes them on); errors name the `config.training` field.

    Args:
      sde: the forward SDE.
      fpe: the `ScoreFPE` estimator (`fpe_from_options`).
      scalar_fp: which terms: 'False' (vector), 'True' (scalar), 'both'.
      fp_dist: where the residual is evaluated: 'pert' (the DSM's x_t and t, sharing its network evaluation),
        'x' (the clean data at the DSM's t), 'random' (uniform in [batch.min(), batch.max()]^D).
      fp_wgt_type: lambda(t) of the vector term: 'constant', 'convention' (g), 'll' (g^2).
      alpha, beta: weights of the vector and scalar terms (0 = not computed).
      m: power of the vector residual's norm.
      fp_batch_fraction: the terms use the first ceil(fp_batch_fraction * B) samples of a batch.
      continuous: whether the model takes continuous times (the terms need d_t s).
    """
    self.sde = sde
    self.fpe = fpe
    self.scalar_fp = utils.check_choice('training.scalar_fp', scalar_fp, SCALAR_FP)
    self.fp_dist = utils.check_choice('training.fp_dist', fp_dist, FP_DISTS)
    self.fp_wgt_type = _fp_weighting(fp_wgt_type)
    self.alpha = utils.check_number('training.alpha', alpha, low=0., high=MAX_FP_WEIGHT)
    self.beta = utils.check_number('training.beta', beta, low=0., high=MAX_FP_WEIGHT)
    self.m = utils.check_number('training.m', m, low=0., low_open=True)
    self.fp_batch_fraction = utils.check_number('training.fp_batch_fraction', fp_batch_fraction, low=0., high=1.,
                                                low_open=True)
    self.vector = scalar_fp in ('False', 'both') and alpha > 0
    self.scalar = scalar_fp in ('True', 'both') and beta > 0
    if self.active and not continuous:
      raise ValueError(f'The score-FPE term (training.alpha={alpha!r}, training.beta={beta!r}) needs a '
                       'continuous-time model (training.continuous=True): the score must be differentiable '
                       'in t. Set both to 0 for SMLD/DDPM training.')
    self.weights = {}
    if self.vector:
      self.weights['fp_vector'] = alpha
    if self.scalar:
      self.weights['fp_scalar'] = beta

  @classmethod
  def from_options(cls, sde, *, continuous, eps=1e-5, **options):
    """The regularizer (and its `ScoreFPE` estimator) of FP options: the one builder.

    Args:
      sde: the forward SDE.
      continuous: whether the model takes continuous times (validated by the caller, `training.continuous`).
      eps: the smallest time the score function is evaluated at.
      **options: `FP_OPTIONS` by name; missing ones take their default there. Each is validated by the
        constructor that consumes it (`ScoreFPE` or this class's), and nowhere else.

    Raises:
      TypeError: for a name not in `FP_OPTIONS`.
    """
    fpe = fpe_from_options(sde, eps=eps, **options)
    return cls(sde, fpe, continuous=continuous,
               **{name: options.get(name, default) for name, default in REGULARIZER_OPTIONS.items()})

  @classmethod
  def from_config(cls, config, sde, *, continuous, eps=1e-5):
    """The regularizer that the `FP_OPTIONS` fields of `config.training` describe (`from_options`).

    The estimator fields are validated even while the regularizer is off, so that a typo does not wait for
    alpha > 0. `continuous` is `training.continuous`, validated by the caller (`losses.loss_from_config`).
    """
    return cls.from_options(sde, continuous=continuous, eps=eps, **fp_options_from_config(config))

  @property
  def active(self):
    """Whether any term is computed."""
    return self.vector or self.scalar

  @property
  def term_names(self):
    return tuple(self.weights)

  @property
  def shares_evaluation(self):
    """Whether the terms are evaluated at the DSM's (x_t, t) and reuse its network evaluation there."""
    return self.active and self.fp_dist == 'pert'

  def describe(self):
    """One line for the log: whether the regularizer is on, and the settings that decide what it penalizes."""
    if not self.active:
      # FP-Diffusion's README puts its weights in Score SDE's default config files, where they are 0 here: a
      # user porting a FP-Diffusion command gets plain DSM unless told.
      return (f'score-FPE regularizer OFF (training.alpha={self.alpha:g}, training.beta={self.beta:g}, '
              f'training.scalar_fp={self.scalar_fp!r}): this is plain DSM training, as in Score SDE. '
              f'FP-Diffusion fine-tuning (alpha=0.15, beta=0.01, on a released Score SDE checkpoint): '
              f'--config={" or ".join(fp_recipes()) or "a config in configs/fp/"}.')
    fpe = self.fpe
    probes = f' ({fpe.num_probes} {fpe.hutchinson_type} probe(s))' if fpe.divergence == 'hutchinson' else ''
    masks = f' (dropout masks {fpe.dropout_masks!r})' if fpe.time_derivative == 'finite_difference' else ''
    return (f'score-FPE regularizer ON: alpha={self.alpha:g} (vector term {"on" if self.vector else "off"}), '
            f'beta={self.beta:g} (scalar term {"on" if self.scalar else "off"}), scalar_fp={self.scalar_fp!r}, '
            f'fp_wgt_type={self.fp_wgt_type!r}, m={self.m:g}, fp_dist={self.fp_dist!r}, '
            f'fp_batch_fraction={self.fp_batch_fraction:g}, time derivative {fpe.time_derivative!r}{masks}, '
            f'divergence {fpe.divergence!r}{probes}.')

  def num_samples(self, batch_size):
    """How many of a batch's samples (the first ones) the terms are computed on."""
    return math.ceil(self.fp_batch_fraction * batch_size) if self.active else 0

  def draw_noise(self, shape, device, dtype=torch.float32, generator=None):
    """The randomness of the terms for a batch of `shape`, each with the sample axis first (see
    `losses.SDELoss.draw_noise`): Hutchinson probes, and the uniform points of `fp_dist='random'`."""
    noise = {}
    if not self.active:
      return noise
    probes = self.fpe.draw_probes(shape, generator, device, dtype)
    if probes is not None:
      noise['fp_probes'] = probes
    if self.fp_dist == 'random':
      noise['fp_uniform'] = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return noise

  def evaluate(self, score_fn, x, t):
    """The network evaluation at (x, t) the terms need (x a leaf requiring grad), in float32."""
    with torch.autocast(x.device.type, enabled=False):
      return self.fpe.evaluate_score(score_fn, x, utils.at_least_float32(t), with_time_derivative=self.vector)

  def __call__(self, score_fn, x0, x_t, t, noise, shared=None, create_graph=True):
    """The per-sample terms of a batch.

    Args:
      score_fn: the score function.
      x0, x_t, t: the batch's clean data, perturbed data and times (the DSM's), each with B samples.
      noise: `draw_noise`'s dict for these B samples.
      shared: `(x, evaluation)` if the DSM loss let `evaluate` run at its (x_t[:k], t[:k]) (`shares_evaluation`).
      create_graph: keep the graph for parameter gradients (training).

    Returns:
      A dict name -> per-sample values, shape (k,), for the active terms.
    """
    k = self.num_samples(x0.shape[0])
    t_fp = utils.at_least_float32(t[:k])
    with torch.enable_grad(), torch.autocast(x0.device.type, enabled=False):
      if shared is not None:
        x, evaluation = shared
      else:
        if self.fp_dist == 'x':
          x = x0[:k]
        elif self.fp_dist == 'random':
          # Uniform over the range the batch spans, as the released code.
          low, high = x0.min(), x0.max()
          x = low + (high - low) * noise['fp_uniform'][:k]
        else:
          x = x_t[:k]
        x = utils.at_least_float32(x.detach()).requires_grad_(True)
        evaluation = self.evaluate(score_fn, x, t_fp)
      probes = noise.get('fp_probes')
      res = self.fpe.residuals(score_fn, x, t_fp, evaluation, vector=self.vector, scalar=self.scalar,
                               create_graph=create_graph, probes=None if probes is None else probes[:k])
    out = {}
    if self.vector:
      out['fp_vector'] = fp_time_weight(self.sde, t_fp, self.fp_wgt_type) * per_sample_vector_term(res['vector'],
                                                                                                  self.m)
    if self.scalar:
      out['fp_scalar'] = res['scalar']
    return out
