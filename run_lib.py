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

This module reads as Score SDE's: set-up, the training loop, the evaluation passes. The pieces it puts together
live elsewhere: the loss object (`losses.loss_from_config`); the step that owns forward, backward, update and
EMA (`trainer.Trainer`); the data set object (`datasets.get_data`) that knows how batches become model input,
how samples are saved and scored and which bits/dim apply; the checkpoints and the save policy
(`checkpoints.Checkpointer`, `checkpoints.await_checkpoint`); a rank's share of the work
(`distributed.over_ranks`, `distributed.on_main_rank`). Under torchrun every rank trains on its share of each
global batch and evaluates its share of the evaluation's batches and sampling rounds; rank 0 alone writes files.
"""

import dataclasses
import itertools
import logging
import math
import os
import typing

import numpy as np
import torch

import checkpoints
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
from models.ema import ExponentialMovingAverage, ema_weights


def build_state(config):
  """Score SDE's training state: `{'optimizer', 'model', 'ema', 'step'}`, freshly initialized."""
  score_model = mutils.create_model(config)
  ema_rate = utils.check_number('model.ema_rate', config.model.ema_rate, low=0, high=1)
  ema = ExponentialMovingAverage(score_model.parameters(), decay=ema_rate)
  optimizer = losses.get_optimizer(config, score_model.parameters())
  return dict(optimizer=optimizer, model=score_model, ema=ema, step=0)


def make_trainer(config, sde, state):
  """The `trainer.Trainer` of a config: its loss, optimizer schedule, precision, accumulation, noise seed and
  lazy regularization (`training.fp_every`, validated by `losses.LazyRegularization`)."""
  return trainer_lib.Trainer(
      losses.loss_from_config(config, sde), losses.optimization_manager(config),
      precision=trainer_lib.PrecisionPolicy(config.training.mixed_precision, config.device),
      grad_accum_steps=config.training.grad_accum_steps,
      noise_seed=utils.config_value(config, 'seed'),
      forward_model=_compiled(config, state),
      fp_every=config.training.fp_every)


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


def _format_terms(values):
  return ', '.join(f'{name}: {value:.5e}' for name, value in values.items())


def summary_writer(tb_dir):
  """A TensorBoard `SummaryWriter` into `tb_dir` (rank 0 only; tests replace it with a recorder)."""
  # Lazy: torch.utils.tensorboard imports TensorFlow when it is installed (seconds); by then the data pipeline
  # has configured TensorFlow to stay off the GPU.
  from torch.utils import tensorboard  # pylint: disable=g-import-not-at-top
  return tensorboard.SummaryWriter(tb_dir)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """Everything a training run uses, built and checked by `setup_training` before anything is written.

  The only things that change during the run are the training state (`state`, updated in place by the
  trainer), the position in `batches`, and what `checkpointer` remembers (the resume point).
  """
  config: typing.Any
  settings: dict  # the loop's validated `training.*` fields (`training_settings`)
  sde: sde_lib.SDE
  state: dict  # Score SDE's `{'optimizer', 'model', 'ema', 'step'}`
  trainer: trainer_lib.Trainer
  data: typing.Any  # a `datasets.get_data` object
  batches: typing.Iterator  # this rank's share of the training batches, from the state's step on
  eval_batches: typing.Iterator  # this rank's share of the periodic eval batches
  checkpointer: checkpoints.Checkpointer
  sampling_fn: typing.Optional[typing.Callable]  # None unless `training.snapshot_sampling`
  sampling_model: torch.nn.Module
  sample_dir: str
  tb_dir: str


def training_settings(config):
  """The loop's own `training.*` fields, validated (the save policy's go to `checkpoints.Checkpointer`)."""
  t = config.training
  settings = dict(
      n_iters=utils.config_value(config, 'training.n_iters'),
      snapshot_freq=utils.check_number('training.snapshot_freq', t.snapshot_freq, low=1, integer=True),
      preemption_freq=utils.check_number('training.snapshot_freq_for_preemption',
                                         t.snapshot_freq_for_preemption, low=1, integer=True),
      log_freq=utils.check_number('training.log_freq', t.log_freq, low=1, integer=True),
      eval_freq=utils.check_number('training.eval_freq', t.eval_freq, low=1, integer=True),
      snapshot_sampling=utils.check_bool('training.snapshot_sampling', t.snapshot_sampling),
      batch_size=utils.config_value(config, 'training.batch_size'),
      grad_accum_steps=utils.config_value(config, 'training.grad_accum_steps'),
      max_param_growth=utils.check_number('training.max_param_growth', t.max_param_growth, low=1,
                                          low_open=True, allow_inf=True),
  )
  # The global batch splits evenly over ranks, then micro-batches: every share has the same weight.
  world_size, k = distributed.context().world_size, settings['grad_accum_steps']
  distributed.check_divisible(
      'training.batch_size', settings['batch_size'], world_size * k,
      'the global batch is split evenly over the ranks, then into micro-batches',
      what=f'parts ({world_size} processes x config.training.grad_accum_steps={k} micro-batches)')
  return settings


def _check_batch_shape(x, shape, split):
  # The model is built for the config's image size and channels; data of another shape would fail deep
  # inside the network (or, worse, silently broadcast), so say which setting disagrees.
  if tuple(x.shape[1:]) != tuple(shape[1:]):
    raise ValueError(f'The {split} data have shape (C, H, W) = {tuple(x.shape[1:])}, but the config expects '
                     f'{tuple(shape[1:])} (config.data.num_channels, config.data.image_size).')


def _check_batch_fits_split(data, batch_size):
  """Refuses a training batch larger than the training split; warns if the periodic eval batch (of the same
  size) is larger than the test split."""
  size = data.split_size('train')
  if size is not None and batch_size > size:
    raise ValueError(f'config.training.batch_size={batch_size} is larger than the training split, which holds '
                     f'{size} images: every batch would repeat images. Use at most {size}.')
  size = data.split_size('test')
  if size is not None and batch_size > size:
    logging.warning('config.training.batch_size=%d is larger than the test split (%d images): the periodic eval '
                    'batches (training.eval_freq) repeat test images.', batch_size, size)


def setup_training(config, workdir, lock=None):
  """Builds and validates everything training needs, and restores the preemption checkpoint if there is one.

  Nothing is written: a config value, the data or a checkpoint that does not fit stops the run here, with the
  workdir as it was.

  Args:
    config: the experiment's config.
    workdir: the working directory.
    lock: the workdir lock rank 0 holds (`preemption.WorkdirLock`), checked before every save; or None.

  Returns:
    A `TrainingRun`.
  """
  ctx = distributed.context()
  settings = training_settings(config)
  seed = utils.config_value(config, 'seed')
  # Every rank builds the same initial weights (then restores the same checkpoint, if any).
  torch.manual_seed(seed)
  sde = sde_lib.sde_from_config(config)
  state = build_state(config)
  trainer = make_trainer(config, sde, state)
  data = datasets.get_data(config)
  shape = data.sample_shape(settings['batch_size'])
  sampling_fn = None
  if settings['snapshot_sampling']:
    sampling_fn = sampling.get_sampling_fn(config, sde, shape, data.inverse_scaler, sde.sampling_eps)
  _check_batch_fits_split(data, settings['batch_size'])

  checkpointer = checkpoints.Checkpointer(
      workdir, n_iters=settings['n_iters'], snapshot_freq=settings['snapshot_freq'],
      preemption_freq=settings['preemption_freq'], max_param_growth=settings['max_param_growth'],
      device=config.device, lock=lock)
  state = checkpointer.restore(state, config.device)
  if checkpointer.resume_step is None and getattr(trainer.loss, 'regularizers', ()):
    # FP-Diffusion fine-tunes a DSM-trained checkpoint; a misplaced checkpoint would otherwise go unnoticed.
    logging.warning('A regularizer is on (%s), but there is no checkpoint at %s: training starts from a fresh '
                    'initialization, not fine-tuning. To fine-tune, copy the pre-trained checkpoint there '
                    '(docs/score_fpe.md).', ', '.join(type(r).__name__ for r in trainer.loss.regularizers),
                    checkpointer.meta_path)
  step = int(state['step'])
  # torch's global generator (dropout) is seeded per step by the training loop; the loss's noise comes from the
  # trainer's per-step generator.
  batches = data.train_batches(step, ctx)
  # Read one batch now, so that data that do not fit the model stop the run before anything is written.
  first_batch = next(batches)
  _check_batch_shape(first_batch, shape, 'training')
  return TrainingRun(
      config=config, settings=settings, sde=sde, state=state, trainer=trainer, data=data,
      batches=itertools.chain([first_batch], batches), eval_batches=data.eval_stream(ctx),
      checkpointer=checkpointer, sampling_fn=sampling_fn, sampling_model=_sampling_model(trainer, state),
      sample_dir=os.path.join(workdir, 'samples'), tb_dir=os.path.join(workdir, 'tensorboard'))


def _make_folders(run):
  """Creates the workdir's folders, checks they are writable, and the TensorBoard writer (rank 0).

  Returns:
    The writer, or None on the other ranks.
  """

  def make():
    run.checkpointer.check_folders()
    for path, purpose in ((run.sample_dir, 'the snapshot samples'), (run.tb_dir, 'the TensorBoard summaries')):
      checkpoints.check_writable(path, purpose)
    return summary_writer(run.tb_dir)

  return distributed.on_main_rank(make)


def _log_terms(writer, prefix, terms, step):
  """Logs the loss terms to TensorBoard (rank 0) and returns them as floats (the loop's only `.item()` calls)."""
  values = {name: value.item() for name, value in distributed.mean_over_ranks(terms).items()}
  if writer is not None:
    for name, value in values.items():
      tag = {'loss': 'training_loss'}.get(name, name) if prefix == 'train' else f'eval_{name}'
      writer.add_scalar(tag, value, step)
  return values


def _log_training_terms(run, writer, terms, step, progress, fp_logged_step):
  """The training log at a `log_freq` step: the step's terms (TensorBoard at `step`) and the log line.

  With lazy regularization (`training.fp_every` > 1) the step computed its regularizers' terms (FP terms) only
  if it was an FP step: the line then shows the FP terms of the latest FP step with its number ('fp_step: N',
  N = `state['step']` after that step's update), and TensorBoard gets them at step N, once (`fp_logged_step`
  is the FP step already written). Every rank makes the same calls: the FP steps are a function of the step.

  Returns:
    The FP step whose terms TensorBoard now has (None if none yet).
  """
  values = _log_terms(writer, 'train', terms, step)
  text = _format_terms(values)
  latest = run.trainer.latest_regularized
  if run.trainer.lazy.every > 1 and latest is not None:
    fp_step, fp_terms = latest
    if fp_step != step:
      # Written at their own step, so that their TensorBoard curves have points only at FP steps.
      fp_values = _log_terms(writer if fp_step != fp_logged_step else None, 'train', fp_terms, fp_step)
      text = f'{text}; {_format_terms(fp_values)}'
    text = f'{text}, fp_step: {fp_step}'
    fp_logged_step = fp_step
  logging.info('step: %d, training_loss: %.5e (%s), %s', step, values['loss'], text, progress.status(step))
  return fp_logged_step


def _stop_on_signal(run, signum):
  """Saves the resume point at the current step (after the checks before a save), logs, raises
  `preemption.TrainingInterrupted` with `preemption.EXIT_STOPPED` (every rank alike)."""
  step = int(run.state['step'])
  message = run.checkpointer.save_resume_point(run.state)
  text = (f'Stopped by {preemption.signal_name(signum)} at step {step}: {message}. Run the same command to resume '
          f'(exit status {preemption.EXIT_STOPPED}).')
  logging.warning(text)
  saved = run.checkpointer.resume_step == step
  raise preemption.TrainingInterrupted(text, signum, step=step,
                                       checkpoint=run.checkpointer.meta_path if saved else None,
                                       exit_code=preemption.EXIT_STOPPED)


def _save_sample_snapshot(run, step):
  """Snapshot samples with the EMA weights (rank 0 samples and writes; the other ranks go on)."""
  if not distributed.context().is_main:
    return
  # requires_grad left alone: flipping it would make a compiled sampling model recompile at every snapshot.
  with ema_weights(run.state, freeze_grads=False):
    sample, _ = run.sampling_fn(run.sampling_model)
  this_sample_dir = os.path.join(run.sample_dir, f'iter_{step}')
  # The data set writes the files (several, in its formats): a full disk is named by their folder.
  with checkpoints.write_errors(f'the snapshot samples of step {step} into {this_sample_dir}'):
    os.makedirs(this_sample_dir, exist_ok=True)
    run.data.save_snapshot(sample, this_sample_dir, step)


def _training_loop(run, writer, stop):
  s, ckpt = run.settings, run.checkpointer
  initial_step = int(run.state['step'])
  logging.info('Starting training loop at step %d (n_iters %d).', initial_step, s['n_iters'])
  progress = utils.Progress(s['n_iters'], 'train', unit='step', done=initial_step,
                            show_bar=distributed.context().is_main)
  # With float16's GradScaler an infinite gradient norm is expected now and then: that step is skipped.
  check_grad_norm = run.trainer.precision.scaler is None
  fp_logged_step = None
  try:
    while int(run.state['step']) < s['n_iters']:
      # A step boundary: where a SIGTERM / SIGINT received during the last step (or setup) takes effect. Every
      # rank agrees on it (one host-side collective per step under torchrun).
      signum = distributed.max_over_ranks(stop.signum or 0)
      if signum:
        _stop_on_signal(run, signum)
      # Dropout draws from the global generator: seeded by (rank, step) before every step (a different stream per
      # rank), so that a resumed run draws what the uninterrupted run drew, whatever sampling or evaluation drew in
      # between.
      torch.manual_seed(utils.seed_for(run.config.seed, 'global', distributed.context().rank,
                                        int(run.state['step'])))
      terms = run.trainer.train_step(run.state, next(run.batches))
      step = int(run.state['step'])  # the step has incremented it: `step` updates are done
      ckpt.monitor.update(terms['loss'], step, run.trainer.last_grad_norm if check_grad_norm else None)
      if step % s['log_freq'] == 0:
        fp_logged_step = _log_training_terms(run, writer, terms, step, progress, fp_logged_step)
        ckpt.check_finite_loss()
      if step % s['eval_freq'] == 0:
        # Score SDE's periodic eval loss on one batch of the eval split (each rank its share), EMA weights.
        values = _log_terms(writer, 'eval', run.trainer.eval_step(run.state, next(run.eval_batches)), step)
        logging.info('step: %d, eval_loss: %.5e (%s)', step, values['loss'], _format_terms(values))
      if ckpt.save_due(run.state, step) and run.sampling_fn is not None:
        _save_sample_snapshot(run, step)
    ckpt.check_finite_loss()
  finally:
    progress.close()


def train(config, workdir):
  """Runs the training pipeline.

  Resumes from `workdir/checkpoints-meta/checkpoint.pth` when it exists (with its optimizer, EMA and step), so
  a released Score SDE checkpoint copied there is fine-tuned from its step. Resuming at or past
  `training.n_iters` logs so and returns. Under torchrun, every rank runs this; rank 0 writes.

  While it runs, rank 0 holds the workdir lock `workdir/train.lock` (`preemption.WorkdirLock`). SIGTERM,
  SIGINT or SIGHUP (`preemption.STOP_SIGNALS`) stops training at the next step boundary with the resume point
  saved at that step (`preemption.TrainingInterrupted`, exit code `preemption.EXIT_STOPPED`); a second signal
  stops at once.

  Args:
    config: Configuration to use.
    workdir: Working directory for checkpoints, samples and TensorBoard summaries.

  Raises:
    ValueError: a config value or the data do not fit; nothing was written to the workdir.
    checkpoints.CheckpointError: the checkpoint cannot be read, does not fit the model or is not finite;
      nothing was written to the workdir.
    preemption.WorkdirLocked: another trainer holds the workdir lock; nothing was written.
    FloatingPointError: the training loss or gradient norm became NaN or infinite, or the parameters exploded;
      the error names the step and the last good checkpoint, which is intact.
    checkpoints.WriteError: a checkpoint or sample could not be written (a full disk): the message names it;
      the previous resume point is intact.
    preemption.TrainingInterrupted: a stop signal; the error says what was saved.
  """
  lock = distributed.on_main_rank(
      lambda: preemption.WorkdirLock(workdir, elastic=distributed.elastic_attempt()).acquire())
  try:
    with preemption.StopOnSignal() as stop:
      run = setup_training(config, workdir, lock=lock)
      _train(run, stop)
  finally:
    if lock is not None:
      lock.release()


def _train(run, stop):
  s, ctx = run.settings, distributed.context()
  logging.info('Loss: %s', run.trainer.loss.describe())
  lazy = run.trainer.lazy.describe(run.trainer.loss)
  if lazy:
    logging.info('Schedule: %s.', lazy)
  logging.info('Batch: %d in all, %d process(es), %d micro-batch(es) per step; precision: %s%s.',
               s['batch_size'], ctx.world_size, s['grad_accum_steps'], run.trainer.precision.name,
               '' if run.trainer.forward_model is None else ', compiled forward')
  run.checkpointer.prepare(run.state)
  step = int(run.state['step'])
  if step >= s['n_iters']:
    logging.info('The checkpoint is at step %d, at or past training.n_iters=%d: nothing to train.', step,
                 s['n_iters'])
    return
  writer = _make_folders(run)
  try:
    _training_loop(run, writer, stop)
  finally:
    if writer is not None:
      writer.close()
  logging.info('Training finished at step %d.', int(run.state['step']))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def eval_settings(config):
  """The `eval.*` fields `evaluate` reads, validated."""
  e = config.eval
  settings = dict(
      begin_ckpt=utils.check_number('eval.begin_ckpt', e.begin_ckpt, low=0, integer=True),
      batch_size=utils.config_value(config, 'eval.batch_size'),
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
      wait_limit_seconds=utils.check_number('eval.wait_limit_seconds', e.wait_limit_seconds, low=0,
                                            allow_inf=True),
      skip_missing_ckpts=utils.check_bool('eval.skip_missing_ckpts', e.skip_missing_ckpts),
  )
  end = utils.check_number('eval.end_ckpt', e.end_ckpt, integer=True)
  if end < settings['begin_ckpt']:
    t = config.training
    raise ValueError(
        f'config.eval.end_ckpt={end} is smaller than config.eval.begin_ckpt={settings["begin_ckpt"]}: no checkpoint '
        f'to evaluate. Checkpoint k is written at step k * training.snapshot_freq (now {t.snapshot_freq}) and at '
        f'the last step, training.n_iters (now {t.n_iters}); the fine-tuning configs derive both bounds from '
        'those fields, so set --config.eval.begin_ckpt and --config.eval.end_ckpt to the checkpoints in '
        'W/checkpoints/ (docs/workflow.md, "Which checkpoints exist").')
  settings['end_ckpt'] = end
  return settings


def _save_npz(path, *unnamed, **named):
  """Writes an .npz atomically (a reader polling the folder never sees half a file)."""
  with checkpoints.atomic_write(path) as fout:
    np.savez_compressed(fout, *unnamed, **named)


def _seeded(config, *what):
  """Seeds torch's global generator for one unit of evaluation work (a batch, a pass, a sampling round).

  The seed is a function of the unit, not of the order of work: every checkpoint is evaluated with the same
  noise (a paired comparison), and a rank evaluating a batch draws what a single process would.
  """
  torch.manual_seed(utils.seed_for(config.seed, *what))


def _check_finite(ckpt, what, values, unit):
  """Raises `FloatingPointError` if `values` (a sequence of numbers) are not all finite: a result computed from
  a checkpoint is written only if it is a number."""
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise FloatingPointError(f'Checkpoint {ckpt}: {what} is not finite (NaN or inf) for {bad.size} of {values.size} '
                             f'{unit}(s) (first: {unit} {bad[0]}); nothing more is written for it. Its weights '
                             'are finite, but the model diverges on these inputs.')


class _LazySummaryWriter:
  """A TensorBoard writer made at its first use (importing TensorBoard takes seconds), closed by `close`."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self._writer = None

  def get(self):
    if self._writer is None:
      self._writer = summary_writer(self.log_dir)
    return self._writer

  def close(self):
    if self._writer is not None:
      self._writer.close()


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Everything `evaluate`'s passes use, built and checked by `setup_evaluation` before anything is written.

  `state` is restored in place from each checkpoint; the passes change nothing else.
  """
  config: typing.Any
  settings: dict  # the validated `eval.*` fields (`eval_settings`)
  sde: sde_lib.SDE
  state: dict
  continuous: bool
  data: typing.Any  # a `datasets.get_data` object
  trainer: trainer_lib.Trainer
  sampling_model: torch.nn.Module
  checkpoint_dir: str
  eval_dir: str
  summaries: _LazySummaryWriter  # `<eval_dir>/tensorboard`, for the conservativity scalars
  likelihood_fn: typing.Optional[typing.Callable] = None  # with eval.enable_bpd
  sampling_fn: typing.Optional[typing.Callable] = None  # with eval.enable_sampling
  fpe: typing.Optional[score_fpe.ScoreFPE] = None  # with eval.enable_fp_residual


def _evaluate_loss(ev, ckpt):
  """Eval loss over the whole eval split: Score SDE's `ckpt_{ckpt}_loss.npz`, plus the regularizer's terms."""

  def loss_terms(index, batch):
    _seeded(ev.config, 'eval_loss', index)
    return {name: value.item() for name, value in ev.trainer.eval_step(ev.state, batch).items()}

  values = {}
  for i, terms in distributed.over_ranks(ev.data.eval_batches('test', only=distributed.is_mine), loss_terms):
    for name, value in terms.items():
      values.setdefault(name, []).append(value)
    if (i + 1) % 1000 == 0:
      logging.info('Finished %dth step loss evaluation', i + 1)
  if not distributed.context().is_main:
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
  _save_npz(os.path.join(ev.eval_dir, f'ckpt_{ckpt}_loss.npz'), **arrays)
  logging.info(message)


def _evaluate_bpd(ev, ckpt):
  """Bits/dim over `eval.bpd_num_repeats` passes of the bpd split; Score SDE's per-batch files."""
  s, is_main = ev.settings, distributed.context().is_main
  split = s['bpd_dataset']
  bpds = []
  num_batches = ev.data.num_eval_batches(split)
  # Adaptive ODE solves cost more function evaluations as they go (and per checkpoint), so the ETA says so.
  progress = utils.Progress(None if num_batches is None else num_batches * s['bpd_num_repeats'],
                            f'ckpt {ckpt} bits/dim', unit='batch', show_bar=is_main,
                            eta_basis='at the rate so far; adaptive ODE solves may slow down')
  # Score SDE's round id, batch_id + len(ds_bpd) * repeat, is the running count of batches.
  bpd_round_id = 0
  for repeat in range(s['bpd_num_repeats']):

    def batch_bpd(index, batch, repeat=repeat):
      _seeded(ev.config, 'bpd', split, repeat, index)
      return ev.likelihood_fn(ev.state['model'], batch)[0].detach().cpu().numpy().reshape(-1)

    batches = ev.data.eval_batches(split, dequantize=ev.data.bpd_dequantize, repeat=repeat, only=distributed.is_mine)
    for batch_id, bpd in distributed.over_ranks(batches, batch_bpd):
      _check_finite(ckpt, f'the bits/dim of batch {batch_id} (repeat {repeat})', bpd, 'example')
      bpds.extend(bpd)
      logging.info('ckpt: %d, repeat: %d, batch: %d, mean bpd: %6f (%s)', ckpt, repeat, batch_id,
                   np.mean(np.asarray(bpds)), progress.status(bpd_round_id + 1))
      # Score SDE's file holds this batch's bits/dim as the unnamed array `arr_0`; `all_bpds` adds all so far.
      _save_npz(os.path.join(ev.eval_dir, f'{split}_ckpt_{ckpt}_bpd_{bpd_round_id}.npz'), bpd,
                all_bpds=np.asarray(bpds))
      bpd_round_id += 1
  progress.close()
  if is_main:
    # Standard error of the mean from the spread of the per-pass means (likelihood.bpd_summary; nan for 1 pass).
    mean, stderr = likelihood.bpd_summary(bpds, s['bpd_num_repeats']) if bpds else (float('nan'), float('nan'))
    logging.info('ckpt: %d, %s bits/dim over %d repeats: %.6f +- %.6f (standard error)', ckpt, split,
                 s['bpd_num_repeats'], mean, stderr)


def _evaluate_samples(ev, ckpt):
  """Samples in rounds of `eval.batch_size` (Score SDE's `ckpt_{ckpt}/samples_{r}.npz`, and per-round
  statistics `statistics_{r}.npz` where the data set has them), then `report_{ckpt}.npz`."""
  s, is_main = ev.settings, distributed.context().is_main
  this_sample_dir = os.path.join(ev.eval_dir, f'ckpt_{ckpt}')
  if is_main:
    os.makedirs(this_sample_dir, exist_ok=True)
  # ceil: Score SDE's num_samples // batch_size + 1 draws a useless extra round when they divide exactly.
  num_rounds = math.ceil(s['num_samples'] / s['batch_size'])
  progress = utils.Progress(num_rounds, f'ckpt {ckpt} sampling', unit='round', show_bar=is_main)

  def sample_round(r, _):
    _seeded(ev.config, 'sampling', r)
    samples, _ = ev.sampling_fn(ev.sampling_model)
    _check_finite(ckpt, f'the samples of round {r}', samples.reshape(samples.shape[0], -1).sum(1).cpu().numpy(),
                  'sample')
    arrays = ev.data.sample_arrays(samples)
    return arrays, ev.data.sample_statistics(arrays)

  rounds = []
  for r, (arrays, stats) in distributed.over_ranks(((r, None) for r in range(num_rounds)), sample_round):
    logging.info('sampling -- ckpt: %d, round: %d (%s)', ckpt, r, progress.status(r + 1))
    _save_npz(os.path.join(this_sample_dir, f'samples_{r}.npz'), samples=arrays)
    if stats is not None:
      _save_npz(os.path.join(this_sample_dir, f'statistics_{r}.npz'), **stats)
    rounds.append((arrays, stats))
  progress.close()
  if is_main:
    metrics = ev.data.sample_quality(rounds, s['num_samples'])
    for name, value in metrics.items():
      _check_finite(ckpt, f'the sample metric {name}', [value], 'value')
    logging.info('ckpt-%d --- %s', ckpt, _format_terms(metrics))
    _save_npz(os.path.join(ev.eval_dir, f'report_{ckpt}.npz'), **metrics)


def _first_eval_batches(ev, count):
  batches = []
  for _, batch in ev.data.eval_batches('test'):
    if len(batches) == count:
      break
    batches.append(batch)
  if len(batches) < count:
    logging.warning('eval.fp_residual_num_batches=%d, but the eval split has only %d batches.', count, len(batches))
  return torch.cat(batches)


def _evaluate_fp_residual(ev, ckpt):
  """The score-FPE residual and/or the conservativity as functions of t on `eval.fp_residual_num_batches` eval
  batches (rank 0).

  Writes `ckpt_{ckpt}_fp_residual.npz` with `t` and, if `eval.enable_fp_residual`, the arrays of
  `score_fpe.residual_vs_time` over the t grid (`residual`, `residual_weighted`, `scalar`, `time_derivative`),
  and, if `eval.enable_conservativity`, `conservativity` (`score_fpe.conservativity_vs_time`), which also goes
  to TensorBoard: the mean over the t grid (`eval_conservativity`) and the value at each t
  (`eval_conservativity/t=...`), at the checkpoint's training step.
  """
  if not distributed.context().is_main:
    return
  s = ev.settings
  x0 = _first_eval_batches(ev, s['fp_residual_num_batches'])
  score_fn = mutils.get_score_fn(ev.sde, ev.state['model'], train=False, continuous=ev.continuous)
  ts = np.linspace(ev.sde.sampling_eps, ev.sde.T, s['fp_residual_num_times'])
  curves = {'t': ts}
  if s['enable_fp_residual']:
    _seeded(ev.config, 'fp_residual')
    # The training run's estimators (`training.fp_*`), so the diagnostic measures what the loss penalizes.
    curves.update(score_fpe.residual_vs_time(score_fn, ev.sde, x0, ts, fpe=ev.fpe,
                                             fp_wgt_type=ev.config.training.fp_wgt_type, m=ev.config.training.m,
                                             batch_size=s['batch_size']))
  if s['enable_conservativity']:
    # A seed of its own: the same x_t whether or not the residual ran before it.
    _seeded(ev.config, 'conservativity')
    curves['conservativity'] = score_fpe.conservativity_vs_time(
        score_fn, ev.sde, x0, ts, num_probes=s['conservativity_num_probes'], batch_size=s['batch_size'])
  for name, values in curves.items():
    _check_finite(ckpt, f'the score-FPE {name}', values, 't')
  _save_npz(os.path.join(ev.eval_dir, f'ckpt_{ckpt}_fp_residual.npz'), **curves)
  for name, what in (('residual', 'score-FPE residual'), ('conservativity', 'score conservativity')):
    if name in curves:
      logging.info('ckpt: %d, %s vs t: %s', ckpt, what,
                   ', '.join(f't={t:.3g}: {r:.4e}' for t, r in zip(curves['t'], curves[name])))
  if 'conservativity' in curves:
    writer, step = ev.summaries.get(), int(ev.state['step'])
    writer.add_scalar('eval_conservativity', float(np.mean(curves['conservativity'])), step)
    for t, value in zip(curves['t'], curves['conservativity']):
      writer.add_scalar(f'eval_conservativity/t={t:.4g}', float(value), step)
    writer.flush()


def _check_eval_batch_fits(data, settings):
  """Refuses an `eval.batch_size` larger than a split that an enabled pass reads in whole batches (it would
  yield no batch: Score SDE drops the last partial one)."""
  readers = {}
  for field, split in (('enable_loss', 'test'), ('enable_fp_residual', 'test'), ('enable_conservativity', 'test'),
                       ('enable_bpd', settings['bpd_dataset'])):
    if settings[field]:
      readers.setdefault(split, []).append(f'eval.{field}')
  batch_size = settings['batch_size']
  for split, fields in readers.items():
    size = data.split_size(split)
    if size is not None and batch_size > size:
      raise ValueError(f'config.eval.batch_size={batch_size} is larger than the {split!r} split, which holds {size} '
                       f'examples: {" and ".join(fields)} read it in whole batches and would get none. Use at '
                       f'most {size}.')


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


def eval_dir_in(workdir, eval_folder, allow_outside_workdir=False):
  """The results folder `workdir/eval_folder`, refused if it is outside the workdir (unless allowed).

  An absolute `eval_folder`, one with '..', or a symbolic link in the path can put it anywhere: evaluation creates
  the folder, probes it with a file and writes its results there, so it stays inside the workdir unless the
  user passes `--allow_outside_workdir`. Judged on the resolved paths (symbolic links followed).

  Raises:
    ValueError: naming `--eval_folder`, where it resolves to, and the flag that allows it.
  """
  eval_dir = os.path.join(workdir, eval_folder)
  root, target = os.path.realpath(workdir), os.path.realpath(eval_dir)
  if not allow_outside_workdir and os.path.commonpath([root, target]) != root:
    raise ValueError(f'--eval_folder={eval_folder!r} resolves to {target}, outside the workdir {root}: evaluation '
                     'results are written inside --workdir. Pass --allow_outside_workdir to write there anyway.')
  return eval_dir


def setup_evaluation(config, workdir, eval_folder, allow_outside_workdir=False):
  """Builds and validates everything evaluation needs (an `Evaluation`); writes nothing.

  The results folder is checked first (`eval_dir_in`).
  """
  eval_dir = eval_dir_in(workdir, eval_folder, allow_outside_workdir)
  settings = eval_settings(config)
  utils.config_value(config, 'seed')
  sde = sde_lib.sde_from_config(config)
  state = build_state(config)
  continuous = utils.config_value(config, 'training.continuous')
  data = datasets.get_data(config)
  _check_eval_batch_fits(data, settings)
  trainer = make_trainer(config, sde, state)
  parts = {}
  if settings['enable_bpd']:
    # The data set says which bits/dim apply: Score SDE's (dequantized 8-bit images, Rademacher trace
    # estimator) or a continuous density's (exact trace); the config says which ODE solver.
    parts['likelihood_fn'] = likelihood.likelihood_fn_from_config(config, sde, data.inverse_scaler,
                                                                  **data.likelihood_options)
  if settings['enable_fp_residual']:
    if not continuous:
      # A discrete-time model sees t only through its rounded noise-level index: d_t s is zero or a jump.
      raise ValueError('eval.enable_fp_residual=True needs a continuous-time model (training.continuous=True); '
                       'the score of a discrete-time model is not differentiable in t.')
    parts['fpe'] = score_fpe.fpe_from_config(config, sde, eps=sde.sampling_eps)
  if settings['enable_conservativity']:
    _check_conservativity_dim(settings, math.prod(data.sample_shape(1)[1:]))
  if settings['enable_sampling']:
    shape = data.sample_shape(settings['batch_size'])
    parts['sampling_fn'] = sampling.get_sampling_fn(config, sde, shape, data.inverse_scaler, sde.sampling_eps)
    data.prepare_sample_quality()
  return Evaluation(
      config=config, settings=settings, sde=sde, state=state, continuous=continuous, data=data, trainer=trainer,
      sampling_model=_sampling_model(trainer, state), checkpoint_dir=os.path.join(workdir, 'checkpoints'),
      eval_dir=eval_dir, summaries=_LazySummaryWriter(os.path.join(eval_dir, 'tensorboard')), **parts)


def evaluate(config, workdir, eval_folder='eval', allow_outside_workdir=False):
  """Evaluates checkpoints `eval.begin_ckpt..eval.end_ckpt` of `workdir/checkpoints/`.

  For each checkpoint (waiting for it if training has not written it yet; see `checkpoints.await_checkpoint`),
  with the EMA weights, and as enabled in `config.eval`, writes to `workdir/<eval_folder>/`:
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
    allow_outside_workdir: allow `eval_folder` to resolve outside `workdir` (`eval_dir_in`).

  Raises:
    ValueError: a config value does not fit (e.g. `eval.batch_size` larger than a split an enabled pass reads),
      or `eval_folder` is outside the workdir; nothing was written.
    checkpoints.WriteError: a result file could not be written (a full disk): the message names it.
    FileNotFoundError: the workdir does not exist; `checkpoints.MissingCheckpointError` (a FileNotFoundError):
      a checkpoint is missing and no trainer will write it.
    TimeoutError: a checkpoint did not appear within `eval.wait_limit_seconds`.
    checkpoints.CheckpointError: a checkpoint cannot be read, does not fit the model or holds non-finite
      weights.
    FloatingPointError: a result of a checkpoint (loss, bits/dim, samples, metrics, residual) is not finite;
      it is not written.
  """
  ev = setup_evaluation(config, workdir, eval_folder, allow_outside_workdir)
  if not os.path.isdir(workdir):
    # Not created: a mistyped --workdir would otherwise wait for checkpoints that nothing writes.
    raise FileNotFoundError(f'The workdir {workdir!r} does not exist: evaluation reads checkpoints from '
                            f'{ev.checkpoint_dir} and creates nothing but its results folder. Check --workdir.')

  def make_eval_dir():
    checkpoints.check_writable(ev.eval_dir, 'the evaluation results')
    # Another evaluation may write into the same folder: only temporary files no write has touched for an hour.
    checkpoints.remove_stale_temp_files(ev.eval_dir, min_age_seconds=3600.)

  distributed.on_main_rank(make_eval_dir)
  s = ev.settings
  logging.info('Evaluating checkpoints %d..%d into %s.', s['begin_ckpt'], s['end_ckpt'], ev.eval_dir)
  evaluated, skipped = [], []
  try:
    for ckpt in range(s['begin_ckpt'], s['end_ckpt'] + 1):
      ckpt_path = os.path.join(ev.checkpoint_dir, f'checkpoint_{ckpt}.pth')
      if not checkpoints.await_checkpoint(ckpt_path, workdir, s['wait_limit_seconds'], s['skip_missing_ckpts']):
        skipped.append(ckpt)
        continue
      evaluated.append(ckpt)
      # Checkpoints are written atomically, so a file that exists is complete: Score SDE's retries after a failed
      # read are not needed, and a checkpoint that does not fit raises.
      checkpoints.restore_checkpoint(ckpt_path, ev.state, config.device)
      ev.state['ema'].copy_to(ev.state['model'].parameters())
      logging.info('ckpt: %d (step %d) loaded from %s', ckpt, int(ev.state['step']), ckpt_path)
      if s['enable_loss']:
        _evaluate_loss(ev, ckpt)
      if s['enable_bpd']:
        _evaluate_bpd(ev, ckpt)
      if s['enable_sampling']:
        _evaluate_samples(ev, ckpt)
      if s['enable_fp_residual'] or s['enable_conservativity']:
        _evaluate_fp_residual(ev, ckpt)
      distributed.barrier()
  finally:
    # Closed on errors too (a non-finite result raises mid-range): the TensorBoard file is flushed and released.
    ev.summaries.close()
  if skipped:
    logging.warning('Skipped %d missing checkpoint(s) that no trainer will write: %s.', len(skipped),
                    ', '.join(map(str, skipped)))
    if not evaluated:
      raise checkpoints.MissingCheckpointError(f'None of checkpoints {s["begin_ckpt"]}..{s["end_ckpt"]} exists in '
                                               f'{ev.checkpoint_dir}, and no trainer will write them.')
