"""Training and evaluation for score-based generative models (Score SDE's `run_lib.py`), with FP-Diffusion.

Workdir layout (Score SDE's, plus the FP files):
  W/checkpoints-meta/checkpoint.pth   preemption checkpoint; training resumes from it (a released Score SDE
                                      checkpoint copied here starts fine-tuning from its step).
  W/checkpoints/checkpoint_{k}.pth    snapshot every `training.snapshot_freq` steps, k = step // snapshot_freq.
  W/samples/iter_{step}/sample.{np,png}  snapshot samples (`training.snapshot_sampling`).
  W/tensorboard/                      TensorBoard scalars.
  W/<eval_folder>/                    evaluation results (see `evaluate`).

Steps count optimizer updates: `state['step']` is the number of updates applied (as in Score SDE's
checkpoints), and training stops when it reaches `training.n_iters`. Everything the run needs (config values, the
data pipeline, the sampler, the checkpoint to resume from) is built and checked before anything is written into
the workdir, so a bad start leaves the workdir as it was.

The pieces: a loss object (`losses.loss_from_config`), the step that owns forward, backward, update and EMA
(`trainer.Trainer`), and a data set object (`datasets.get_data`) that knows how batches become model input, how
samples are saved and scored and which bits/dim apply. Under torchrun (`distributed.py`) every rank trains on
its share of each global batch and evaluates its share of the evaluation's batches and sampling rounds; rank 0
alone writes files.
"""

import logging
import math
import os
import time
import types

import numpy as np
import torch

import datasets
import distributed
import likelihood
import losses
import preemption
import sampling
import score_fpe
import sde_lib
import trainer as trainer_lib
import utils
import models  # noqa: F401  (registers every architecture with models.utils)
from models import utils as mutils
from models.ema import ExponentialMovingAverage

# `evaluate` waits for checkpoints that training has not written yet: it checks every
# CHECKPOINT_POLL_SECONDS (Score SDE: 60 s), stops when no live trainer holds the workdir lock, and gives up
# with `TimeoutError` after `eval.wait_limit_seconds`. CHECKPOINT_WAIT_LIMIT_SECONDS, if not None, lowers that
# bound further (for scripts and tests), and is `wait_for_checkpoint`'s default (None: no bound, as Score SDE).
CHECKPOINT_POLL_SECONDS = 60.
CHECKPOINT_WAIT_LIMIT_SECONDS = None


def _build_state(config):
  """Score SDE's training state: `{'optimizer', 'model', 'ema', 'step'}`, freshly initialized."""
  score_model = mutils.create_model(config)
  ema_rate = utils.check_number('model.ema_rate', config.model.ema_rate, low=0, high=1)
  ema = ExponentialMovingAverage(score_model.parameters(), decay=ema_rate)
  optimizer = losses.get_optimizer(config, score_model.parameters())
  return dict(optimizer=optimizer, model=score_model, ema=ema, step=0)


def _check_batch_shape(x, shape, split):
  # The model is built for the config's image size and channels; data of another shape would fail deep
  # inside the network (or, worse, silently broadcast), so say which setting disagrees.
  if tuple(x.shape[1:]) != tuple(shape[1:]):
    raise ValueError(f'The {split} data have shape (C, H, W) = {tuple(x.shape[1:])}, but the config expects '
                     f'{tuple(shape[1:])} (config.data.num_channels, config.data.image_size).')


def _sample_with_ema(sampling_fn, model, state):
  """Samples with the EMA weights (through `model`, which may be a compiled module sharing the state's
  parameters), then puts the training weights back."""
  ema, params = state['ema'], state['model'].parameters
  ema.store(params())
  ema.copy_to(params())
  try:
    sample, _ = sampling_fn(model)
  finally:
    ema.restore(params())
  return sample


def _compiled(config, state):
  """`torch.compile`d forward module sharing the model's parameters if `training.compile`, else None."""
  if not utils.check_bool('training.compile', config.training.compile):
    return None
  model = state['model']
  inner = model.module if isinstance(model, torch.nn.DataParallel) else model
  # The inner module: the checkpoint keys stay the DataParallel model's (Score SDE's), and compiled graphs do
  # not trace DataParallel's scatter. The score-FPE regularizer does not use it (no double backward).
  return torch.compile(inner)


def _sampling_model(trainer, state):
  """The module samplers call: the compiled forward module if there is one (it shares the parameters)."""
  return state['model'] if trainer.forward_model is None else trainer.forward_model


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _training_settings(config):
  """The loop's own `training.*` fields, validated."""
  t = config.training
  return dict(
      n_iters=utils.check_number('training.n_iters', t.n_iters, low=0, integer=True),
      snapshot_freq=utils.check_number('training.snapshot_freq', t.snapshot_freq, low=1, integer=True),
      preemption_freq=utils.check_number('training.snapshot_freq_for_preemption',
                                         t.snapshot_freq_for_preemption, low=1, integer=True),
      log_freq=utils.check_number('training.log_freq', t.log_freq, low=1, integer=True),
      eval_freq=utils.check_number('training.eval_freq', t.eval_freq, low=1, integer=True),
      snapshot_sampling=utils.check_bool('training.snapshot_sampling', t.snapshot_sampling),
      batch_size=utils.check_number('training.batch_size', t.batch_size, low=1, integer=True),
      grad_accum_steps=utils.check_number('training.grad_accum_steps', t.grad_accum_steps, low=1, integer=True),
      max_param_growth=utils.check_number('training.max_param_growth', t.max_param_growth, low=1,
                                          low_open=True),
  )


def _check_batch_split(settings, ctx):
  """The global batch must split evenly over ranks, then micro-batches: every share has the same weight."""
  batch_size, k = settings['batch_size'], settings['grad_accum_steps']
  if batch_size % (ctx.world_size * k):
    raise ValueError(f'config.training.batch_size={batch_size} must be a multiple of the number of processes '
                     f'({ctx.world_size}) times config.training.grad_accum_steps={k}: the global batch is split '
                     'evenly over the ranks, then into micro-batches.')


def _check_batch_fits_split(data, settings):
  """Refuses a training batch larger than the training split; warns if the periodic eval batch (of the same
  size) is larger than the test split."""
  batch_size = settings['batch_size']
  size = data.split_size('train')
  if size is not None and batch_size > size:
    raise ValueError(f'config.training.batch_size={batch_size} is larger than the training split, which holds '
                     f'{size} images: every batch would repeat images. Use at most {size}.')
  size = data.split_size('test')
  if size is not None and batch_size > size:
    logging.warning('config.training.batch_size=%d is larger than the test split (%d images): the periodic eval '
                    'batches (training.eval_freq) repeat test images.', batch_size, size)


def make_trainer(config, sde, state):
  """The `trainer.Trainer` of a config: its loss, optimizer schedule, precision, accumulation and noise seed."""
  return trainer_lib.Trainer(
      losses.loss_from_config(config, sde), losses.optimization_manager(config),
      precision=trainer_lib.PrecisionPolicy(config.training.mixed_precision, config.device),
      grad_accum_steps=config.training.grad_accum_steps,
      noise_seed=utils.check_number('seed', config.seed, low=0, integer=True),
      forward_model=_compiled(config, state))


def _setup_training(config, workdir):
  """Builds and validates everything training needs, and restores the preemption checkpoint if there is one.

  Nothing is written: a config value, the data or a checkpoint that does not fit stops the run here, with the
  workdir as it was.
  """
  ctx = distributed.context()
  settings = _training_settings(config)
  _check_batch_split(settings, ctx)
  seed = utils.check_number('seed', config.seed, low=0, integer=True)
  # Every rank builds the same initial weights (then restores the same checkpoint, if any).
  torch.manual_seed(seed)
  sde = sde_lib.sde_from_config(config)
  state = _build_state(config)
  trainer = make_trainer(config, sde, state)
  data = datasets.get_data(config)
  shape = data.sample_shape(settings['batch_size'])
  sampling_fn = None
  if settings['snapshot_sampling']:
    sampling_fn = sampling.get_sampling_fn(config, sde, shape, data.inverse_scaler, sde.sampling_eps)

  _check_batch_fits_split(data, settings)

  meta_path = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
  if os.path.lexists(meta_path):  # a dangling symbolic link is an error, not "no checkpoint"
    # Strict: a checkpoint that does not fit the model (or holds NaN) raises here, before training writes.
    state = utils.restore_checkpoint(meta_path, state, config.device)
    logging.info('Resuming from %s at step %d.', meta_path, int(state['step']))
  else:
    logging.info('No checkpoint at %s: training starts from a fresh initialization.', meta_path)
  step = int(state['step'])
  # Dropout and samplers draw from the global generator: a different stream per rank, and a resumed run does
  # not replay the run it resumes. (The loss's noise comes from the trainer's per-step generator.)
  torch.manual_seed(utils.seed_for(seed, 'global', ctx.rank, step))

  iterators = {'train': data.train_batches(step, ctx), 'eval': data.eval_stream(ctx)}
  # Read one batch now, so that data that do not fit the model stop the run before anything is written.
  first_batch = next(iterators['train'])
  _check_batch_shape(first_batch, shape, 'training')

  return types.SimpleNamespace(
      config=config, ctx=ctx, settings=settings, sde=sde, state=state, trainer=trainer, data=data,
      sampling_fn=sampling_fn, sampling_model=_sampling_model(trainer, state), iterators=iterators,
      pending_batch=first_batch, meta_path=meta_path, checkpoint_dir=os.path.join(workdir, 'checkpoints'),
      sample_dir=os.path.join(workdir, 'samples'), tb_dir=os.path.join(workdir, 'tensorboard'),
      workdir=workdir, monitor=NonFiniteLossMonitor(config.device),
      # The resume point on disk (None: none yet) and the parameter scale the growth bound compares with.
      resume_step=step if os.path.lexists(meta_path) else None, param_scale=_param_scale(state),
      lock=None, stop=None)


def _on_main_rank(fn):
  """Runs `fn` on rank 0 alone; an exception there is raised on every rank (itself on rank 0, a RuntimeError
  quoting it on the others), so that all ranks stop alike.

  Returns:
    What `fn` returned, on rank 0; None on the other ranks.
  """
  ctx = distributed.context()
  result, error = None, None
  if ctx.is_main:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, on every rank)
      error = e
  message = distributed.broadcast_object(None if error is None else f'{type(error).__name__}: {error}')
  if error is not None:
    raise error
  if message is not None:
    raise RuntimeError(f'Rank 0 stopped: {message}')
  return result


def _make_workdir(run):
  """Creates the workdir's folders, checks they are writable, and the TensorBoard writer (rank 0).

  Returns:
    The writer, or None on the other ranks.
  """

  def make():
    # Before the first step: an unwritable folder found at the first checkpoint would lose the steps before it.
    for path, purpose in ((run.checkpoint_dir, 'the snapshot checkpoints'),
                          (os.path.dirname(run.meta_path), 'the resume point (preemption checkpoint)'),
                          (run.sample_dir, 'the snapshot samples'), (run.tb_dir, 'the TensorBoard summaries')):
      utils.check_writable(path, purpose)
    # Lazy: torch.utils.tensorboard imports TensorFlow when it is installed; by now the data pipeline has
    # configured TensorFlow to stay off the GPU.
    from torch.utils import tensorboard  # pylint: disable=g-import-not-at-top
    return tensorboard.SummaryWriter(run.tb_dir)

  return _on_main_rank(make)


class NonFiniteLossMonitor:
  """Remembers the first step whose training loss, or gradient norm, was NaN or infinite, without a host-device
  sync.

  `update` runs every step with device-side ops only; `check` reads the flags (one sync) and is called at
  `log_freq` and before every checkpoint save, so no checkpoint is ever written after a non-finite loss or
  gradient. Under torchrun the flags are combined over ranks (the earliest bad step of any), so every rank
  stops alike.
  """

  _NONE = torch.iinfo(torch.long).max
  _WHAT = ('training loss', 'gradient norm')

  def __init__(self, device):
    self._first_bad_step = torch.full((len(self._WHAT),), self._NONE, dtype=torch.long, device=device)

  def update(self, loss, step, grad_norm=None):
    """Records `step` if `loss` (or `grad_norm`, a 0-dim tensor or None) is not finite; device-side only."""
    values = [loss.detach().float().reshape(())]
    values.append(values[0].new_zeros(()) if grad_norm is None else grad_norm.detach().float().reshape(()))
    bad = ~torch.isfinite(torch.stack(values))
    self._first_bad_step = torch.where(bad, torch.clamp(self._first_bad_step, max=step), self._first_bad_step)

  def check(self, last_good=''):
    """Raises `FloatingPointError` naming the first bad step (and `last_good`, a sentence) if there was one."""
    first_bad = distributed.all_reduce_min(self._first_bad_step).tolist()
    bad = [(step, what) for step, what in zip(first_bad, self._WHAT) if step != self._NONE]
    if bad:
      step, what = min(bad)
      raise FloatingPointError(
          f'The {what} is not finite (NaN or inf) at step {step}; training stopped, and nothing from that step on '
          f'was saved. {last_good or "The checkpoints written before that step are intact."} Lower optim.lr or '
          'check the data.')


def _param_scale(state):
  """The largest absolute value of a trainable parameter (NaN if one is NaN): one host sync."""
  params = [p.detach() for p in state['model'].parameters() if p.requires_grad]
  if not params:
    return 0.
  return float(torch.stack([p.abs().max() for p in params]).max())


def _ema_finite(state):
  shadow = state['ema'].shadow_params
  return not shadow or bool(torch.stack([torch.isfinite(p).all() for p in shadow]).all())


def _last_good(run):
  """A sentence naming the last good checkpoint on disk, for errors that stop training."""
  if run.resume_step is None:
    return 'No checkpoint was written yet.'
  return (f'The last good checkpoint is {run.meta_path} (step {run.resume_step}); training resumes from it when '
          'started again.')


def _check_before_save(run, step):
  """Refuses to write checkpoints of a state that is not finite, or has exploded, or when the lock is lost.

  The criterion (docs/workflow.md, "When a run dies"): no NaN/inf training loss or gradient norm at any step
  since the last check; every trainable parameter and EMA weight finite; the largest |trainable parameter| at
  most `training.max_param_growth` times max(1, its value at the last good checkpoint). Parameters are the
  same on every rank, so every rank reaches the same verdict; rank 0 also checks that it still holds the
  workdir lock.

  Raises:
    FloatingPointError: naming the step, the problem and the last good checkpoint.
    preemption.WorkdirLocked: the lock file is no longer this trainer's.
  """
  run.monitor.check(_last_good(run))
  scale = _param_scale(run.state)
  problem = None
  if not math.isfinite(scale) or not _ema_finite(run.state):
    problem = 'the parameters or their EMA are not finite (NaN or inf)'
  else:
    limit = run.settings['max_param_growth'] * max(1., run.param_scale)
    if scale > limit:
      problem = (f'the largest |parameter| grew to {scale:.4g}, more than training.max_param_growth='
                 f'{run.settings["max_param_growth"]:g} times max(1, {run.param_scale:.4g}), its value at the last '
                 'check: the weights exploded')
  if problem is not None:
    raise FloatingPointError(f'Not saving at step {step}: {problem}. Training stopped. {_last_good(run)} Lower '
                             'optim.lr (or raise training.max_param_growth if such growth is expected).')
  run.param_scale = scale

  def lock_problem():
    problem = None if run.lock is None else run.lock.check_held()
    if problem is not None:
      raise preemption.WorkdirLocked(f'Not saving at step {step}: {problem}. Another trainer may be writing '
                                     'into this workdir; this one stops without writing.')

  _on_main_rank(lock_problem)


def _mean_over_ranks(terms):
  """The mean over ranks of a dict of 0-dim tensors (one collective; the identity in one process)."""
  ctx = distributed.context()
  if not ctx.distributed:
    return terms
  names = list(terms)
  summed = distributed.all_reduce_sum(torch.stack([terms[name].float() for name in names]))
  return {name: summed[i] / ctx.world_size for i, name in enumerate(names)}


def _log_terms(writer, prefix, terms, step):
  """Logs the loss terms to TensorBoard (rank 0) and returns them as floats (the loop's only `.item()` calls)."""
  values = {name: value.item() for name, value in _mean_over_ranks(terms).items()}
  if writer is not None:
    for name, value in values.items():
      tag = {'loss': 'training_loss'}.get(name, name) if prefix == 'train' else f'eval_{name}'
      writer.add_scalar(tag, value, step)
  return values


def _format_terms(values):
  return ', '.join(f'{name}: {value:.5e}' for name, value in values.items())


def _snapshot_path(run, step):
  return os.path.join(run.checkpoint_dir, f'checkpoint_{step // run.settings["snapshot_freq"]}.pth')


def _snapshot_due(run, step):
  return step == run.settings['n_iters'] or step % run.settings['snapshot_freq'] == 0


def _save_checkpoints(run, step):
  """Writes the snapshot and the preemption checkpoint due at `step` (rank 0), after `_check_before_save`;
  returns whether a snapshot was due."""
  s = run.settings
  due_meta = step == s['n_iters'] or step % s['preemption_freq'] == 0
  due_snapshot = _snapshot_due(run, step)
  if due_meta or due_snapshot:
    _check_before_save(run, step)
  if run.ctx.is_main:
    # The snapshot first, each file durable before the next: once the resume point is past step k, no run
    # writes snapshot k again, so a kill between the two writes must find the snapshot on disk.
    if due_snapshot:
      path = _snapshot_path(run, step)
      utils.save_checkpoint(path, run.state)
      logging.info('step: %d, saved %s', step, path)
    if due_meta:
      utils.save_checkpoint(run.meta_path, run.state)
  if due_meta:
    run.resume_step = step
  return due_snapshot


def _write_missing_snapshot(run):
  """Writes the snapshot due at the resume point's step if it is missing (rank 0).

  A run of an earlier version, killed between writing its resume point and its snapshot, resumed past the
  snapshot's step and never wrote it; the resume point holds exactly the state the snapshot would have.
  """
  step = run.resume_step
  if not run.ctx.is_main or not step or not _snapshot_due(run, step):
    return
  path = _snapshot_path(run, step)
  if not os.path.lexists(path):
    logging.warning('The snapshot %s due at step %d is missing (a run killed between its two saves): writing it '
                    'from the resume point, which holds that step.', path, step)
    utils.save_checkpoint(path, run.state)


def _stop_signal(run):
  """The stop signal any rank received (0 if none): one host-side collective per step under torchrun."""
  return distributed.max_over_ranks(0 if run.stop is None else run.stop.signum or 0)


def _stop_on_signal(run, signum):
  """Saves the resume point at the current step (after `_check_before_save`), logs, raises
  `preemption.TrainingInterrupted` with `preemption.EXIT_STOPPED` (every rank alike)."""
  step = int(run.state['step'])
  name = preemption.signal_name(signum)
  if run.resume_step == step:
    message = f'the resume point {run.meta_path} is at this step already'
  elif step == 0:
    message = 'no step was trained: nothing to save'
  else:
    _check_before_save(run, step)
    if run.ctx.is_main:
      utils.save_checkpoint(run.meta_path, run.state)
    run.resume_step = step
    message = f'saved the resume point {run.meta_path}'
  text = (f'Stopped by {name} at step {step}: {message}. Run the same command to resume (exit status '
          f'{preemption.EXIT_STOPPED}).')
  logging.warning(text)
  raise preemption.TrainingInterrupted(text, signum, step=step,
                                       checkpoint=run.meta_path if run.resume_step == step else None,
                                       exit_code=preemption.EXIT_STOPPED)


def _save_sample_snapshot(run, step):
  """Snapshot samples with the EMA weights (rank 0 samples and writes; the other ranks go on)."""
  if not run.ctx.is_main:
    return
  sample = _sample_with_ema(run.sampling_fn, run.sampling_model, run.state)
  this_sample_dir = os.path.join(run.sample_dir, f'iter_{step}')
  os.makedirs(this_sample_dir, exist_ok=True)
  run.data.save_snapshot(sample, this_sample_dir, step)


def _eval_step(run, writer, step):
  """Score SDE's periodic eval loss on one batch of the eval split (each rank its share), EMA weights."""
  terms = run.trainer.eval_step(run.state, next(run.iterators['eval']))
  values = _log_terms(writer, 'eval', terms, step)
  logging.info('step: %d, eval_loss: %.5e (%s)', step, values['loss'], _format_terms(values))


def _training_loop(run, writer):
  s = run.settings
  initial_step = int(run.state['step'])
  logging.info('Starting training loop at step %d (n_iters %d).', initial_step, s['n_iters'])
  progress = utils.Progress(s['n_iters'], 'train', unit='step', done=initial_step, show_bar=run.ctx.is_main)
  # With float16's GradScaler an infinite gradient norm is expected now and then: that step is skipped.
  check_grad_norm = run.trainer.precision.scaler is None
  try:
    while int(run.state['step']) < s['n_iters']:
      # A step boundary: where a SIGTERM / SIGINT received during the last step (or setup) takes effect.
      signum = _stop_signal(run)
      if signum:
        _stop_on_signal(run, signum)
      batch = run.pending_batch if run.pending_batch is not None else next(run.iterators['train'])
      run.pending_batch = None
      terms = run.trainer.train_step(run.state, batch)
      step = int(run.state['step'])  # the step has incremented it: `step` updates are done
      run.monitor.update(terms['loss'], step, run.trainer.last_grad_norm if check_grad_norm else None)
      if step % s['log_freq'] == 0:
        values = _log_terms(writer, 'train', terms, step)
        logging.info('step: %d, training_loss: %.5e (%s), %s', step, values['loss'], _format_terms(values),
                     progress.status(step))
        run.monitor.check(_last_good(run))
      if step % s['eval_freq'] == 0:
        _eval_step(run, writer, step)
      if _save_checkpoints(run, step) and run.sampling_fn is not None:
        _save_sample_snapshot(run, step)
    run.monitor.check(_last_good(run))
  finally:
    progress.close()


def train(config, workdir):
  """Runs the training pipeline.

  Resumes from `workdir/checkpoints-meta/checkpoint.pth` when it exists (with its optimizer, EMA and step), so
  a released Score SDE checkpoint copied there is fine-tuned from its step. Resuming at or past
  `training.n_iters` logs so and returns. Under torchrun, every rank runs this; rank 0 writes.

  While it runs, rank 0 holds the workdir lock `workdir/train.lock` (`preemption.WorkdirLock`). SIGTERM or
  SIGINT stops training at the next step boundary with the resume point saved at that step
  (`preemption.TrainingInterrupted`, exit code `preemption.EXIT_STOPPED`); a second signal stops at once.

  Args:
    config: Configuration to use.
    workdir: Working directory for checkpoints, samples and TensorBoard summaries.

  Raises:
    ValueError: a config value or the data do not fit; nothing was written to the workdir.
    utils.CheckpointError: the checkpoint cannot be read, does not fit the model or is not finite; nothing
      was written to the workdir.
    preemption.WorkdirLocked: another trainer holds the workdir lock; nothing was written.
    FloatingPointError: the training loss or gradient norm became NaN or infinite, or the parameters exploded;
      the error names the step and the last good checkpoint, which is intact.
    preemption.TrainingInterrupted: SIGTERM / SIGINT; the error says what was saved.
  """
  lock = _on_main_rank(lambda: preemption.WorkdirLock(workdir).acquire())
  try:
    with preemption.StopOnSignal() as stop:
      run = _setup_training(config, workdir)
      run.lock, run.stop = lock, stop
      _train(run)
  finally:
    if lock is not None:
      lock.release()


def _train(run):
  logging.info('Loss: %s', run.trainer.loss.describe())
  logging.info('Batch: %d in all, %d process(es), %d micro-batch(es) per step; precision: %s%s.',
               run.settings['batch_size'], run.ctx.world_size, run.settings['grad_accum_steps'],
               run.trainer.precision.name, '' if run.trainer.forward_model is None else ', compiled forward')
  if run.ctx.is_main:
    # Under the lock no other process writes the checkpoints: a temporary file there is what a killed save left.
    # In the workdir itself, another trainer may be writing its lock record (for milliseconds) to be refused.
    for folder, min_age in ((run.checkpoint_dir, 0.), (os.path.dirname(run.meta_path), 0.), (run.workdir, 60.)):
      utils.remove_stale_temp_files(folder, min_age_seconds=min_age)
  _on_main_rank(lambda: _write_missing_snapshot(run))
  step = int(run.state['step'])
  if step >= run.settings['n_iters']:
    logging.info('The checkpoint is at step %d, at or past training.n_iters=%d: nothing to train.', step,
                 run.settings['n_iters'])
    return
  writer = _make_workdir(run)
  try:
    _training_loop(run, writer)
  finally:
    if writer is not None:
      writer.close()
  logging.info('Training finished at step %d.', int(run.state['step']))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def _eval_settings(config):
  """The `eval.*` fields `evaluate` reads, validated."""
  e = config.eval
  settings = dict(
      begin_ckpt=utils.check_number('eval.begin_ckpt', e.begin_ckpt, low=0, integer=True),
      batch_size=utils.check_number('eval.batch_size', e.batch_size, low=1, integer=True),
      enable_loss=utils.check_bool('eval.enable_loss', e.enable_loss),
      enable_bpd=utils.check_bool('eval.enable_bpd', e.enable_bpd),
      enable_sampling=utils.check_bool('eval.enable_sampling', e.enable_sampling),
      enable_fp_residual=utils.check_bool('eval.enable_fp_residual', e.enable_fp_residual),
      num_samples=utils.check_number('eval.num_samples', e.num_samples, low=1, integer=True),
      bpd_dataset=utils.check_choice('eval.bpd_dataset', e.bpd_dataset, ('train', 'test')),
      bpd_num_repeats=utils.check_number('eval.bpd_num_repeats', e.bpd_num_repeats, low=1, integer=True),
      fp_residual_num_times=utils.check_number('eval.fp_residual_num_times', e.fp_residual_num_times, low=1,
                                               integer=True),
      fp_residual_num_batches=utils.check_number('eval.fp_residual_num_batches', e.fp_residual_num_batches,
                                                 low=1, integer=True),
      enable_conservativity=utils.check_bool('eval.enable_conservativity', e.enable_conservativity),
      conservativity_num_probes=utils.check_number('eval.conservativity_num_probes', e.conservativity_num_probes,
                                                   low=0, integer=True),
      wait_limit_seconds=utils.check_number('eval.wait_limit_seconds', e.wait_limit_seconds, low=0),
      skip_missing_ckpts=utils.check_bool('eval.skip_missing_ckpts', e.skip_missing_ckpts),
  )
  settings['end_ckpt'] = utils.check_number('eval.end_ckpt', e.end_ckpt, low=settings['begin_ckpt'],
                                            integer=True)
  return settings


def _save_npz(path, *unnamed, **named):
  """Writes an .npz atomically (a reader polling the folder never sees half a file)."""
  with utils.atomic_write(path) as fout:
    np.savez_compressed(fout, *unnamed, **named)


class MissingCheckpointError(FileNotFoundError):
  """A checkpoint that does not exist, and that no running trainer will write."""


def wait_for_checkpoint(path, poll_seconds=None, limit_seconds=None, trainer_status=None):
  """Waits until `path` exists, as Score SDE's evaluation waits for training to write a checkpoint.

  Args:
    path: the checkpoint file.
    poll_seconds: seconds between checks; default `CHECKPOINT_POLL_SECONDS`.
    limit_seconds: give up after this many seconds; default `CHECKPOINT_WAIT_LIMIT_SECONDS` (None: forever).
    trainer_status: optional callable returning `(alive, description)`, e.g. `preemption.trainer_status` of
      the workdir: while the file is missing, `alive` False stops the wait (nothing will write it), None
      (cannot tell) waits on.

  Raises:
    MissingCheckpointError: the checkpoint does not exist and `trainer_status` says no trainer runs.
    TimeoutError: the checkpoint did not appear within `limit_seconds`.
  """
  poll_seconds = CHECKPOINT_POLL_SECONDS if poll_seconds is None else poll_seconds
  limit_seconds = CHECKPOINT_WAIT_LIMIT_SECONDS if limit_seconds is None else limit_seconds
  start = time.time()
  logged = set()
  description = ''
  # lexists: a dangling symbolic link is there, and restoring it says what is wrong with it.
  while not os.path.lexists(path):
    if trainer_status is not None:
      alive, description = trainer_status()
      # Look again: a trainer writes its last snapshot before it releases the lock.
      if alive is False and not os.path.lexists(path):
        raise MissingCheckpointError(
            f'Checkpoint {path} does not exist, and no trainer will write it: {description}. Check eval.begin_ckpt '
            'and eval.end_ckpt (checkpoint k is written at step k * training.snapshot_freq and at the last step), '
            'or set eval.skip_missing_ckpts=True to evaluate the checkpoints that exist.')
      if alive is None and 'unknown' not in logged:
        logging.warning('%s; waiting for %s as long as allowed.', description, path)
        logged.add('unknown')
    waited = time.time() - start
    if limit_seconds is not None and waited >= limit_seconds:
      raise TimeoutError(f'Checkpoint {path} did not appear within {limit_seconds:g} s (eval.wait_limit_seconds)'
                         + (f'; {description}' if description else '') + '.')
    if 'waiting' not in logged:
      logging.warning('Waiting for %s: training has not written it yet (checking every %g s%s).', path,
                      poll_seconds, '' if limit_seconds is None else f', for at most {limit_seconds:g} s')
      logged.add('waiting')
    time.sleep(poll_seconds if limit_seconds is None else max(0., min(poll_seconds, limit_seconds - waited)))


def _seeded(config, *what):
  """Seeds torch's global generator for one unit of evaluation work (a batch, a pass, a sampling round).

  The seed is a function of the unit, not of the order of work: every checkpoint is evaluated with the same
  noise (a paired comparison), and a rank evaluating a batch draws what a single process would.
  """
  torch.manual_seed(utils.seed_for(config.seed, *what))


def over_ranks(items, fn):
  """Applies `fn` to the items of an ordered sequence of work, each rank to its share, in waves.

  Every rank iterates `items` alike: pairs `(index, item)` with indices 0, 1, 2, ... Rank r computes
  `fn(index, item)` for the indices with index % world_size == r (the others' items may be None: not
  converted); after each wave of world_size items the results are gathered to rank 0.

  Yields:
    On rank 0, `(index, result)` for every item, in index order (one wave at a time, so results can be
    written as they come); nothing on the other ranks. In one process: every item, one at a time.
  """
  ctx = distributed.context()
  mine = []
  count = 0
  for index, item in items:
    count = index + 1
    if index % ctx.world_size == ctx.rank:
      mine.append((index, fn(index, item)))
    if count % ctx.world_size == 0:
      yield from _gathered(mine)
      mine = []
  if count % ctx.world_size:
    yield from _gathered(mine)


def _gathered(mine):
  gathered = distributed.gather_objects(mine)
  if gathered is None:
    return
  yield from sorted((pair for rank_pairs in gathered for pair in rank_pairs), key=lambda pair: pair[0])


def _mine(index):
  ctx = distributed.context()
  return index % ctx.world_size == ctx.rank


def _evaluate_loss(ctx, ckpt):
  """Eval loss over the whole eval split: Score SDE's `ckpt_{ckpt}_loss.npz`, plus the regularizer's terms."""

  def loss_terms(index, batch):
    _seeded(ctx.config, 'eval_loss', index)
    return {name: value.item() for name, value in ctx.trainer.eval_step(ctx.state, batch).items()}

  values = {}
  for i, terms in over_ranks(ctx.data.eval_batches('test', only=_mine), loss_terms):
    for name, value in terms.items():
      values.setdefault(name, []).append(value)
    if (i + 1) % 1000 == 0:
      logging.info('Finished %dth step loss evaluation', i + 1)
  if not ctx.is_main:
    return
  for name, term in values.items():
    _check_finite(ckpt, f'the eval {name}', term, 'batch')
  all_losses = np.asarray(values['loss'])
  arrays = dict(all_losses=all_losses, mean_loss=all_losses.mean())
  message = f'ckpt: {ckpt}, eval_loss: {all_losses.mean():.5e}'
  if len(values) > 2:  # a regularizer is on: its terms, and the DSM loss they add to
    for name, term in values.items():
      if name == 'loss':
        continue
      term = np.asarray(term)
      arrays[f'all_{name}'] = term
      arrays[f'mean_{name}'] = term.mean()
      message += f', {name}: {term.mean():.5e}'
  _save_npz(os.path.join(ctx.eval_dir, f'ckpt_{ckpt}_loss.npz'), **arrays)
  logging.info(message)


def _evaluate_bpd(ctx, ckpt):
  """Bits/dim over `eval.bpd_num_repeats` passes of the bpd split; Score SDE's per-batch files."""
  s = ctx.settings
  split = s['bpd_dataset']
  bpds = []
  num_batches = ctx.data.num_eval_batches(split)
  progress = utils.Progress(None if num_batches is None else num_batches * s['bpd_num_repeats'],
                            f'ckpt {ckpt} bits/dim', unit='batch', show_bar=ctx.is_main)
  # Score SDE's round id, batch_id + len(ds_bpd) * repeat, is the running count of batches.
  bpd_round_id = 0
  for repeat in range(s['bpd_num_repeats']):

    def batch_bpd(index, batch, repeat=repeat):
      _seeded(ctx.config, 'bpd', split, repeat, index)
      return ctx.likelihood_fn(ctx.state['model'], batch)[0].detach().cpu().numpy().reshape(-1)

    batches = ctx.data.eval_batches(split, dequantize=ctx.data.bpd_dequantize, repeat=repeat, only=_mine)
    for batch_id, bpd in over_ranks(batches, batch_bpd):
      _check_finite(ckpt, f'the bits/dim of batch {batch_id} (repeat {repeat})', bpd, 'example')
      bpds.extend(bpd)
      logging.info('ckpt: %d, repeat: %d, batch: %d, mean bpd: %6f (%s)', ckpt, repeat, batch_id,
                   np.mean(np.asarray(bpds)), progress.status(bpd_round_id + 1))
      # Score SDE's file holds this batch's bits/dim as the unnamed array `arr_0`; `all_bpds` adds all so far.
      _save_npz(os.path.join(ctx.eval_dir, f'{split}_ckpt_{ckpt}_bpd_{bpd_round_id}.npz'), bpd,
                all_bpds=np.asarray(bpds))
      bpd_round_id += 1
  progress.close()
  if ctx.is_main:
    # Standard error of the mean from the spread of the per-pass means (likelihood.bpd_summary; nan for 1 pass).
    mean, stderr = likelihood.bpd_summary(bpds, s['bpd_num_repeats']) if bpds else (float('nan'), float('nan'))
    logging.info('ckpt: %d, %s bits/dim over %d repeats: %.6f +- %.6f (standard error)', ckpt, split,
                 s['bpd_num_repeats'], mean, stderr)


def _evaluate_samples(ctx, ckpt):
  """Samples in rounds of `eval.batch_size` (Score SDE's `ckpt_{ckpt}/samples_{r}.npz`, and per-round
  statistics `statistics_{r}.npz` where the data set has them), then `report_{ckpt}.npz`."""
  s = ctx.settings
  this_sample_dir = os.path.join(ctx.eval_dir, f'ckpt_{ckpt}')
  if ctx.is_main:
    os.makedirs(this_sample_dir, exist_ok=True)
  # ceil: Score SDE's num_samples // batch_size + 1 draws a useless extra round when they divide exactly.
  num_rounds = math.ceil(s['num_samples'] / s['batch_size'])
  progress = utils.Progress(num_rounds, f'ckpt {ckpt} sampling', unit='round', show_bar=ctx.is_main)

  def sample_round(r, _):
    _seeded(ctx.config, 'sampling', r)
    samples, _ = ctx.sampling_fn(ctx.sampling_model)
    _check_finite(ckpt, f'the samples of round {r}', samples.reshape(samples.shape[0], -1).sum(1).cpu().numpy(),
                  'sample')
    arrays = ctx.data.sample_arrays(samples)
    return arrays, ctx.data.sample_statistics(arrays)

  rounds = []
  for r, (arrays, stats) in over_ranks(((r, None) for r in range(num_rounds)), sample_round):
    logging.info('sampling -- ckpt: %d, round: %d (%s)', ckpt, r, progress.status(r + 1))
    _save_npz(os.path.join(this_sample_dir, f'samples_{r}.npz'), samples=arrays)
    if stats is not None:
      _save_npz(os.path.join(this_sample_dir, f'statistics_{r}.npz'), **stats)
    rounds.append((arrays, stats))
  progress.close()
  if ctx.is_main:
    metrics = ctx.data.sample_quality(rounds, s['num_samples'])
    for name, value in metrics.items():
      _check_finite(ckpt, f'the sample metric {name}', [value], 'value')
    logging.info('ckpt-%d --- %s', ckpt, _format_terms(metrics))
    _save_npz(os.path.join(ctx.eval_dir, f'report_{ckpt}.npz'), **metrics)


def _evaluate_fp_residual(ctx, ckpt):
  """The score-FPE residual and/or the conservativity as functions of t on `eval.fp_residual_num_batches` eval
  batches (rank 0).

  Writes `ckpt_{ckpt}_fp_residual.npz` with `t` and, if `eval.enable_fp_residual`, the arrays of
  `score_fpe.residual_vs_time` over the t grid (`residual`, `residual_weighted`, `scalar`, `time_derivative`),
  and, if `eval.enable_conservativity`, `conservativity` (`score_fpe.conservativity_vs_time`), which also goes
  to TensorBoard.
  """
  if not ctx.is_main:
    return
  s = ctx.settings
  batches = []
  for _, batch in ctx.data.eval_batches('test'):
    if len(batches) == s['fp_residual_num_batches']:
      break
    batches.append(batch)
  if len(batches) < s['fp_residual_num_batches']:
    logging.warning('eval.fp_residual_num_batches=%d, but the eval split has only %d batches.',
                    s['fp_residual_num_batches'], len(batches))
  score_fn = mutils.get_score_fn(ctx.sde, ctx.state['model'], train=False, continuous=ctx.continuous)
  ts = np.linspace(ctx.sde.sampling_eps, ctx.sde.T, s['fp_residual_num_times'])
  curves = {'t': ts}
  if s['enable_fp_residual']:
    _seeded(ctx.config, 'fp_residual')
    # The training run's estimators (`training.fp_*`), so the diagnostic measures what the loss penalizes.
    curves.update(score_fpe.residual_vs_time(score_fn, ctx.sde, torch.cat(batches), ts, fpe=ctx.fpe,
                                             fp_wgt_type=ctx.config.training.fp_wgt_type, m=ctx.config.training.m,
                                             batch_size=s['batch_size']))
  if s['enable_conservativity']:
    # A seed of its own: the same x_t whether or not the residual ran before it.
    _seeded(ctx.config, 'conservativity')
    curves['conservativity'] = score_fpe.conservativity_vs_time(
        score_fn, ctx.sde, torch.cat(batches), ts, num_probes=s['conservativity_num_probes'],
        batch_size=s['batch_size'])
  for name, values in curves.items():
    _check_finite(ckpt, f'the score-FPE {name}', values, 't')
  _save_npz(os.path.join(ctx.eval_dir, f'ckpt_{ckpt}_fp_residual.npz'), **curves)
  for name, what in (('residual', 'score-FPE residual'), ('conservativity', 'score conservativity')):
    if name in curves:
      logging.info('ckpt: %d, %s vs t: %s', ckpt, what,
                   ', '.join(f't={t:.3g}: {r:.4e}' for t, r in zip(curves['t'], curves[name])))
  if 'conservativity' in curves:
    _write_conservativity_summaries(ctx, curves)


def _eval_summary_writer(tb_dir):
  # Lazy, as in training: torch.utils.tensorboard imports TensorFlow when it is installed (seconds).
  from torch.utils import tensorboard  # pylint: disable=g-import-not-at-top
  return tensorboard.SummaryWriter(tb_dir)


def _write_conservativity_summaries(ctx, curves):
  """TensorBoard scalars at the checkpoint's training step, in `<eval_dir>/tensorboard`: the mean over the t
  grid (`eval_conservativity`) and the value at each t (`eval_conservativity/t=...`)."""
  if ctx.writer is None:
    ctx.writer = _eval_summary_writer(os.path.join(ctx.eval_dir, 'tensorboard'))
  step = int(ctx.state['step'])
  ctx.writer.add_scalar('eval_conservativity', float(np.mean(curves['conservativity'])), step)
  for t, value in zip(curves['t'], curves['conservativity']):
    ctx.writer.add_scalar(f'eval_conservativity/t={t:.4g}', float(value), step)
  ctx.writer.flush()


def _check_eval_batch_fits(data, settings):
  """Refuses an `eval.batch_size` larger than a split that an enabled pass reads in whole batches (it would
  yield no batch: Score SDE drops the last partial one)."""
  readers = {}
  if settings['enable_loss']:
    readers.setdefault('test', []).append('eval.enable_loss')
  if settings['enable_fp_residual']:
    readers.setdefault('test', []).append('eval.enable_fp_residual')
  if settings['enable_conservativity']:
    readers.setdefault('test', []).append('eval.enable_conservativity')
  if settings['enable_bpd']:
    readers.setdefault(settings['bpd_dataset'], []).append('eval.enable_bpd')
  batch_size = settings['batch_size']
  for split, fields in readers.items():
    size = data.split_size(split)
    if size is not None and batch_size > size:
      raise ValueError(f'config.eval.batch_size={batch_size} is larger than the {split!r} split, which holds {size} '
                       f'examples: {" and ".join(fields)} read it in whole batches and would get none. Use at '
                       f'most {size}.')


def _check_finite(ckpt, what, values, unit):
  """Raises `FloatingPointError` if `values` (a sequence of numbers) are not all finite: a result computed from
  a checkpoint is written only if it is a number."""
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise FloatingPointError(f'Checkpoint {ckpt}: {what} is not finite (NaN or inf) for {bad.size} of {values.size} '
                             f'{unit}(s) (first: {unit} {bad[0]}); nothing more is written for it. Its weights '
                             'are finite, but the model diverges on these inputs.')


def _await_checkpoint(ctx, workdir, path):
  """Waits for checkpoint `path` (rank 0 decides, every rank follows): True to evaluate it, False to skip it.

  Raises:
    MissingCheckpointError: no trainer will write it, and `eval.skip_missing_ckpts` is False.
    TimeoutError: it did not appear within `eval.wait_limit_seconds`.
  """
  s = ctx.settings
  limit = s['wait_limit_seconds']
  if CHECKPOINT_WAIT_LIMIT_SECONDS is not None:
    limit = min(limit, CHECKPOINT_WAIT_LIMIT_SECONDS)

  def wait():
    try:
      wait_for_checkpoint(path, limit_seconds=limit, trainer_status=lambda: preemption.trainer_status(workdir))
    except MissingCheckpointError as e:
      if not s['skip_missing_ckpts']:
        raise
      logging.warning('Skipping checkpoint %s (eval.skip_missing_ckpts=True): %s', path, e)
      return False
    return True

  return distributed.broadcast_object(_on_main_rank(wait))


CONSERVATIVITY_MAX_EXACT_DIM = 64


def _check_conservativity_dim(settings, dim):
  """Refuses the exact Jacobian (`eval.conservativity_num_probes = 0`) for data of more than
  `CONSERVATIVITY_MAX_EXACT_DIM` dimensions: D backward passes and a (B, D, D) tensor per batch."""
  probes = settings['conservativity_num_probes']
  if probes == 0 and dim > CONSERVATIVITY_MAX_EXACT_DIM:
    raise ValueError(f'config.eval.conservativity_num_probes={probes} asks for the exact Jacobian, but the data have '
                     f'{dim} dimensions (at most {CONSERVATIVITY_MAX_EXACT_DIM} allowed for the exact one: it takes '
                     'D backward passes per batch). Set it to a positive number of Rademacher probes per sample, '
                     'e.g. 4.')


def _setup_evaluation(config, workdir, eval_folder):
  """Builds and validates everything evaluation needs; writes nothing."""
  dist_ctx = distributed.context()
  settings = _eval_settings(config)
  utils.check_number('seed', config.seed, low=0, integer=True)
  sde = sde_lib.sde_from_config(config)
  state = _build_state(config)
  continuous = utils.check_bool('training.continuous', config.training.continuous)
  data = datasets.get_data(config)
  _check_eval_batch_fits(data, settings)
  trainer = make_trainer(config, sde, state)
  ctx = types.SimpleNamespace(
      config=config, settings=settings, sde=sde, state=state, continuous=continuous, data=data, trainer=trainer,
      is_main=dist_ctx.is_main, likelihood_fn=None, sampling_fn=None, writer=None,
      sampling_model=_sampling_model(trainer, state), fpe=None,
      checkpoint_dir=os.path.join(workdir, 'checkpoints'), eval_dir=os.path.join(workdir, eval_folder))
  if settings['enable_bpd']:
    # The data set says which bits/dim apply: Score SDE's (dequantized 8-bit images, Rademacher trace
    # estimator) or a continuous density's (exact trace); the config says which ODE solver.
    ctx.likelihood_fn = likelihood.likelihood_fn_from_config(config, sde, data.inverse_scaler,
                                                             **data.likelihood_options)
  if settings['enable_fp_residual']:
    if not continuous:
      # A discrete-time model sees t only through its rounded noise-level index: d_t s is zero or a jump.
      raise ValueError('eval.enable_fp_residual=True needs a continuous-time model (training.continuous=True); '
                       'the score of a discrete-time model is not differentiable in t.')
    ctx.fpe = score_fpe.fpe_from_config(config, sde, eps=sde.sampling_eps)
  if settings['enable_conservativity']:
    _check_conservativity_dim(settings, math.prod(data.sample_shape(1)[1:]))
  if settings['enable_sampling']:
    shape = data.sample_shape(settings['batch_size'])
    ctx.sampling_fn = sampling.get_sampling_fn(config, sde, shape, data.inverse_scaler, sde.sampling_eps)
    data.prepare_sample_quality()
  return ctx


def evaluate(config, workdir, eval_folder='eval'):
  """Evaluates checkpoints `eval.begin_ckpt..eval.end_ckpt` of `workdir/checkpoints/`.

  For each checkpoint (waiting for it if training has not written it yet; see `wait_for_checkpoint`), with
  the EMA weights, and as enabled in `config.eval`, writes to `workdir/<eval_folder>/`:
    - `ckpt_{ckpt}_loss.npz`: `all_losses`, `mean_loss` over the eval split (Score SDE), plus `all_dsm`,
      `all_fp_vector`, `all_fp_scalar` and their means when the FP regularizer is on;
    - `{bpd_dataset}_ckpt_{ckpt}_bpd_{round}.npz`: bits/dim per batch and repeat (Score SDE's round id
      `batch + num_batches * repeat`; the batch's values as `arr_0`, as Score SDE, and `all_bpds` so far);
    - `ckpt_{ckpt}/samples_{r}.npz` (and, for images, `statistics_{r}.npz` with Inception `pool_3`, `logits`),
      then `report_{ckpt}.npz`: `IS`, `fid`, `kid` for images, the `toy.sample_quality` metrics for TOY data;
    - `ckpt_{ckpt}_fp_residual.npz`: the score-FPE residual on a grid of `eval.fp_residual_num_times` t in
      [sde.sampling_eps, T] (`score_fpe.residual_vs_time`: `t`, `residual`, `residual_weighted`, `scalar`,
      `time_derivative`), and with `eval.enable_conservativity` the score's relative Jacobian asymmetry on the
      same grid and batches (`conservativity`, from `score_fpe.conservativity_vs_time`; also TensorBoard
      scalars in `<eval_folder>/tensorboard/`). With only the conservativity enabled, the file holds `t` and
      `conservativity`.
  Every unit of work (a batch of the loss or of a bits/dim pass, a sampling round) draws its noise from a seed
  of its own, so the numbers do not depend on how many processes evaluate (torchrun splits the units over
  ranks; rank 0 writes the same files as a single process).

  A checkpoint that training has not written yet is waited for while a live trainer holds the workdir lock
  (`workdir/train.lock`), for at most `eval.wait_limit_seconds`; with no trainer running, a missing checkpoint
  stops the evaluation (or, with `eval.skip_missing_ckpts`, is skipped).

  Args:
    config: Configuration to use.
    workdir: Working directory holding `checkpoints/` (it must exist).
    eval_folder: The subfolder for storing evaluation results.

  Raises:
    ValueError: a config value does not fit (e.g. `eval.batch_size` larger than a split an enabled pass reads);
      nothing was written.
    FileNotFoundError: the workdir does not exist; `MissingCheckpointError` (a FileNotFoundError): a
      checkpoint is missing and no trainer will write it.
    TimeoutError: a checkpoint did not appear within `eval.wait_limit_seconds`.
    utils.CheckpointError: a checkpoint cannot be read, does not fit the model or holds non-finite weights.
    FloatingPointError: a result of a checkpoint (loss, bits/dim, samples, metrics, residual) is not finite;
      it is not written.
  """
  ctx = _setup_evaluation(config, workdir, eval_folder)
  if not os.path.isdir(workdir):
    # Not created: a mistyped --workdir would otherwise wait for checkpoints that nothing writes.
    raise FileNotFoundError(f'The workdir {workdir!r} does not exist: evaluation reads checkpoints from '
                            f'{os.path.join(workdir, "checkpoints")} and creates nothing but its results folder. '
                            'Check --workdir.')

  def make_eval_dir():
    utils.check_writable(ctx.eval_dir, 'the evaluation results')
    # Another evaluation may write into the same folder: only temporary files no write has touched for an hour.
    utils.remove_stale_temp_files(ctx.eval_dir, min_age_seconds=3600.)

  _on_main_rank(make_eval_dir)
  s = ctx.settings
  logging.info('Evaluating checkpoints %d..%d into %s.', s['begin_ckpt'], s['end_ckpt'], ctx.eval_dir)
  evaluated, skipped = [], []
  for ckpt in range(s['begin_ckpt'], s['end_ckpt'] + 1):
    ckpt_path = os.path.join(ctx.checkpoint_dir, f'checkpoint_{ckpt}.pth')
    if not _await_checkpoint(ctx, workdir, ckpt_path):
      skipped.append(ckpt)
      continue
    evaluated.append(ckpt)
    # Checkpoints are written atomically (utils.save_checkpoint), so a file that exists is complete: Score
    # SDE's retries after a failed read are not needed, and a checkpoint that does not fit raises.
    ctx.state = utils.restore_checkpoint(ckpt_path, ctx.state, config.device)
    ctx.state['ema'].copy_to(ctx.state['model'].parameters())
    logging.info('ckpt: %d (step %d) loaded from %s', ckpt, int(ctx.state['step']), ckpt_path)
    if s['enable_loss']:
      _evaluate_loss(ctx, ckpt)
    if s['enable_bpd']:
      _evaluate_bpd(ctx, ckpt)
    if s['enable_sampling']:
      _evaluate_samples(ctx, ckpt)
    if s['enable_fp_residual'] or s['enable_conservativity']:
      _evaluate_fp_residual(ctx, ckpt)
    distributed.barrier()
  if ctx.writer is not None:
    ctx.writer.close()
  if skipped:
    logging.warning('Skipped %d missing checkpoint(s) that no trainer will write: %s.', len(skipped),
                    ', '.join(map(str, skipped)))
    if not evaluated:
      raise MissingCheckpointError(f'None of checkpoints {s["begin_ckpt"]}..{s["end_ckpt"]} exists in '
                                   f'{ctx.checkpoint_dir}, and no trainer will write them.')
