"""The training step, owned by one object: precision policy, accumulation, gradient averaging, update, EMA.

`Trainer.train_step(state, batch)` does, in order: draw the step's noise, decide whether the step computes the
regularizers' terms (lazy regularization, `training.fp_every`: `losses.LazyRegularization`), forward and
backward pass of each micro-batch under the precision policy, average the gradients over ranks
(torch.distributed), unscale (float16), clip, optimizer step, EMA update. `state` is Score SDE's dict
`{'optimizer', 'model', 'ema', 'step'}`.
`losses.get_step_fn` is the same step with Score SDE's numerics (float32, one batch, one process, the global
random generator): both use the update and evaluation primitives of `losses` (`apply_update`, `eval_terms`).

Noise. With `noise_seed` set (run_lib does), everything random in a step (t, z, Hutchinson probes, ...) is
drawn for the *global* batch from a generator seeded by (noise_seed, step), and each rank and micro-batch
takes the slice of its samples. A step is then the same computation whether the global batch is split over
ranks, over micro-batches or not at all, and a resumed run draws the noise the uninterrupted run would have.
Dropout masks still come from torch's global generator (seeded per rank by run_lib).
"""

import contextlib

import torch

import distributed
import losses
import utils

MIXED_PRECISIONS = ('no', 'bf16', 'fp16')
_AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


class PrecisionPolicy:
  """`training.mixed_precision`: what runs in half precision, and the gradient scaler float16 needs.

  - 'no': float32 everywhere (Score SDE's numerics).
  - 'bf16' / 'fp16': the loss's forward pass under `torch.autocast` (convolutions and matmuls in half
    precision), so its backward pass too; float16 scales the loss with a `GradScaler` so that small gradients
    do not flush to zero, and skips the update of a step whose gradients overflowed. Parameters, optimizer
    state, EMA and checkpoints stay float32; the DSM loss is reduced in float32, and the score-FPE regularizer
    runs entirely in float32 (`score_fpe.ScoreFPERegularizer`).
  """

  def __init__(self, mixed_precision='no', device='cpu'):
    self.name = utils.check_choice('training.mixed_precision', mixed_precision, MIXED_PRECISIONS)
    self.device_type = torch.device(device).type
    self.dtype = _AUTOCAST_DTYPES.get(self.name)
    self.scaler = torch.amp.GradScaler(self.device_type) if self.name == 'fp16' else None

  def autocast(self):
    """The context the loss's forward pass runs in."""
    if self.dtype is None:
      return contextlib.nullcontext()
    return torch.autocast(self.device_type, dtype=self.dtype)

  def backward(self, loss):
    (loss if self.scaler is None else self.scaler.scale(loss)).backward()


def slice_noise(noise, start, length):
  """The noise of samples start..start+length-1 of a batch (every entry has the sample axis first)."""
  return {name: value[start:start + length] for name, value in noise.items()}


def step_generator(seed, step, device):
  """The generator of a training step's noise: a function of (seed, step) only."""
  generator = torch.Generator(device=device)
  generator.manual_seed(utils.seed_for(seed, 'train_step', step))
  return generator


class Trainer:
  """One optimizer step (and the evaluation step) of a loss on Score SDE's training state."""

  def __init__(self, loss, optimize_fn=None, *, precision=None, grad_accum_steps=1, noise_seed=None,
               forward_model=None, fp_every=1):
    """Builds the step.

    Args:
      loss: a `losses.Loss`.
      optimize_fn: `losses.optimization_manager(config)` (warmup, clipping, optimizer step); training only.
      precision: a `PrecisionPolicy` (default: float32).
      grad_accum_steps: micro-batches per optimizer step; the (per-rank) batch must divide by it.
      noise_seed: seed of the per-step noise generator (see the module docstring); None draws the noise from
        torch's global generator, per micro-batch, as Score SDE.
      forward_model: optional replacement of `state['model']` for the loss's forward passes (a
        `torch.compile`d module sharing its parameters). The score-FPE regularizer, which differentiates the
        network twice, always uses `state['model']`; a lazy step without it runs the whole batch compiled.
      fp_every: lazy regularization (`training.fp_every`, `losses.LazyRegularization`): the regularizers' terms
        only on the steps that are multiples of it, at fp_every x their weight.
    """
    self.loss = loss
    self.optimize_fn = optimize_fn
    self.precision = precision or PrecisionPolicy()
    self.grad_accum_steps = utils.check_field('training.grad_accum_steps', grad_accum_steps)
    self.noise_seed = noise_seed
    self.forward_model = forward_model
    self.lazy = losses.LazyRegularization(fp_every)
    self.last_grad_norm = None
    # (step, terms) of the latest training step that computed the regularizers: `state['step']` after its
    # update (the step it is logged under) and its regularizers' terms, detached. For the log of lazy runs.
    self.latest_regularized = None

  def _loss_terms(self, model, batch, train, noise, sum_over_ranks=None, world_size=1, regularize=True,
                  regularizer_scale=1):
    """`Loss.terms` on `batch` (the objective 'loss' and the reduced terms), under the precision policy;
    `regularize` and `regularizer_scale` as `Loss.__call__`'s and `Loss.terms`'s."""
    with self.precision.autocast():
      forward_model = model if self.forward_model is None else self.forward_model
      per_sample = self.loss(forward_model, batch, train, noise=noise, eager_model=model, regularize=regularize)
    return self.loss.terms(per_sample, batch.shape[0], sum_over_ranks=sum_over_ranks, world_size=world_size,
                           regularizer_scale=regularizer_scale)

  def _step_noise(self, batch, step):
    """This rank's slice of the step's global noise, or None (drawn by the loss, per micro-batch)."""
    if self.noise_seed is None:
      return None
    ctx = distributed.context()
    b = batch.shape[0]
    generator = step_generator(self.noise_seed, step, batch.device)
    global_batch = b * ctx.world_size
    noise = self.loss.draw_noise((global_batch,) + tuple(batch.shape[1:]), batch.device, batch.dtype, generator)
    return slice_noise(noise, distributed.share(global_batch, ctx).start, b)

  def train_step(self, state, batch):
    """One optimizer step on this rank's share `batch` of the global batch.

    With lazy regularization (`fp_every` > 1), a step whose global step `state['step']` is not a multiple of
    `fp_every` computes the DSM term alone; the others compute every term, the regularizers' at `fp_every` x
    their weight in the objective (`latest_regularized` keeps their terms for the log).

    Returns:
      A dict of detached 0-dim tensors: 'loss' (the step's objective) and every term the step computed, each
      the mean over the micro-batches of this rank's values (for logging; no host sync happens here).
    """
    losses.check_optimize_fn(self.optimize_fn)
    model, optimizer = state['model'], state['optimizer']
    b, k = batch.shape[0], self.grad_accum_steps
    if b % k:
      raise ValueError(f'The batch of {b} samples (per rank) does not divide into training.grad_accum_steps='
                       f'{k} micro-batches.')
    ctx = distributed.context()
    sum_over_ranks = distributed.all_reduce_sum if ctx.distributed else None
    step = int(state['step'])
    noise = self._step_noise(batch, step)
    regularize = self.lazy.regularizes(step)
    optimizer.zero_grad(set_to_none=True)
    micro = b // k
    logged = {}
    for j in range(k):
      part = slice(j * micro, (j + 1) * micro)
      terms = self._loss_terms(model, batch[part], True,
                               None if noise is None else slice_noise(noise, j * micro, micro),
                               sum_over_ranks, ctx.world_size, regularize, self.lazy.every)
      # Each micro-batch's mean weighs 1/k: the gradient of the mean over the whole batch.
      self.precision.backward(terms['loss'] / k)
      for name, value in terms.items():
        logged[name] = logged.get(name, 0.) + value.detach() / k
    distributed.all_reduce_gradients(model.parameters())
    kwargs = {} if self.precision.scaler is None else {'scaler': self.precision.scaler}
    self.last_grad_norm = losses.apply_update(state, self.optimize_fn, **kwargs)
    if regularize and self.loss.regularizer_term_names:
      self.latest_regularized = (int(state['step']),
                                 {name: logged[name] for name in self.loss.regularizer_term_names})
    return logged

  def eval_step(self, state, batch, noise=None):
    """The loss on `batch` with the EMA weights, without parameter gradients (Score SDE's eval step).

    Returns:
      A dict of detached 0-dim tensors: 'loss' and every term the loss reports.
    """
    return losses.eval_terms(state, lambda model: self._loss_terms(model, batch, False, noise))
