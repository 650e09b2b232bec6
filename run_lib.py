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
"""

import gc
import logging
import math
import os
import time
import types

import numpy as np
import torch

import datasets
import evaluation
import likelihood
import losses
import sampling
import score_fpe
import sde_lib
import toy
import utils
import models  # noqa: F401  (registers every architecture with models.utils)
from models import utils as mutils
from models.ema import ExponentialMovingAverage

# `evaluate` waits for checkpoints that training has not written yet: it checks every
# CHECKPOINT_POLL_SECONDS (Score SDE: 60 s) and gives up with `TimeoutError` after CHECKPOINT_WAIT_LIMIT_SECONDS
# (None: wait forever, as Score SDE). Module constants, so tests and scripts can bound the wait.
CHECKPOINT_POLL_SECONDS = 60.
CHECKPOINT_WAIT_LIMIT_SECONDS = None


def _active_terms(config):
  """The loss terms the config computes, of the step fn's 'loss', 'dsm', 'fp_vector', 'fp_scalar'.

  The step fn (`return_terms=True`) reports a term it does not compute as NaN: such terms are neither logged
  nor saved.
  """
  t = config.training
  losses.check_fp_options(t.scalar_fp, t.fp_dist, t.fp_wgt_type, t.alpha, t.beta, t.m, t.fp_batch_fraction)
  vector, scalar = losses.fp_terms_active(t.scalar_fp, t.alpha, t.beta)
  return ('loss', 'dsm') + (('fp_vector',) if vector else ()) + (('fp_scalar',) if scalar else ())


def _is_toy(config):
  return config.data.dataset == 'TOY'


def _sample_shape(config, batch_size):
  """Shape (B, C, H, W) of a batch as the model sees it."""
  channels = utils.check_number('data.num_channels', config.data.num_channels, low=1, integer=True)
  size = utils.check_number('data.image_size', config.data.image_size, low=1, integer=True)
  return (batch_size, channels, size, size)


def _to_model_input(batch, config, scaler):
  """A dataset batch (NHWC, in [0, 1] for images) as the model's input: NCHW on the device, scaled."""
  # A copy: tf.data's arrays are read-only, which torch.from_numpy warns about.
  x = torch.from_numpy(np.array(batch['image'], dtype=np.float32)).to(config.device).permute(0, 3, 1, 2)
  return scaler(x)


def _check_batch_shape(x, shape, split):
  # The model is built for the config's image size and channels; data of another shape would fail deep
  # inside the network (or, worse, silently broadcast), so say which setting disagrees.
  if tuple(x.shape[1:]) != tuple(shape[1:]):
    raise ValueError(f'The {split} data have shape (C, H, W) = {tuple(x.shape[1:])}, but the config expects '
                     f'{tuple(shape[1:])} (config.data.num_channels, config.data.image_size).')


def _next_batch(iterators, name, dataset):
  """Next batch of a dataset, restarting its iterator when a finite dataset is exhausted."""
  try:
    return next(iterators[name])
  except StopIteration:
    iterators[name] = iter(dataset)
    return next(iterators[name])


def _build_state(config):
  """Score SDE's training state: `{'optimizer', 'model', 'ema', 'step'}`, freshly initialized."""
  score_model = mutils.create_model(config)
  ema_rate = utils.check_number('model.ema_rate', config.model.ema_rate, low=0, high=1)
  ema = ExponentialMovingAverage(score_model.parameters(), decay=ema_rate)
  optimizer = losses.get_optimizer(config, score_model.parameters())
  return dict(optimizer=optimizer, model=score_model, ema=ema, step=0)


def _snapshot_images(sample, path_np, path_png):
  """Score SDE's snapshot files: uint8 NHWC samples (`np.save` to `sample.np`) and a PNG grid."""
  from torchvision.utils import make_grid, save_image  # lazy: torchvision is only needed for images
  nrow = int(np.sqrt(sample.shape[0]))
  image_grid = make_grid(sample, nrow, padding=2)
  images = np.clip(sample.permute(0, 2, 3, 1).cpu().numpy() * 255, 0, 255).astype(np.uint8)
  with open(path_np, 'wb') as fout:
    np.save(fout, images)
  save_image(image_grid, path_png)


def _snapshot_points(config, sample, path_np, path_png, step):
  """Snapshot of 2-D toy samples: float (N, 2) points and a scatter plot next to the true density."""
  points = sample.reshape(sample.shape[0], -1).cpu().numpy()
  with open(path_np, 'wb') as fout:
    np.save(fout, points)
  toy.plot_samples(toy.reference_samples(config, points.shape[0]), {f'step {step}': points}, path_png,
                   title=f'{config.data.toy}, step {step}')


def _sample_with_ema(sampling_fn, state):
  """Samples with the EMA weights, then puts the training weights back."""
  model, ema = state['model'], state['ema']
  ema.store(model.parameters())
  ema.copy_to(model.parameters())
  try:
    sample, _ = sampling_fn(model)
  finally:
    ema.restore(model.parameters())
  return sample


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
  )


def _setup_training(config, workdir):
  """Builds and validates everything training needs, and restores the preemption checkpoint if there is one.

  Nothing is written: a config value, the data or a checkpoint that does not fit stops the run here, with the
  workdir as it was.
  """
  settings = _training_settings(config)
  torch.manual_seed(utils.check_number('seed', config.seed, low=0, integer=True))
  sde = sde_lib.sde_from_config(config)
  state = _build_state(config)
  optimize_fn = losses.optimization_manager(config)
  train_step_fn = losses.step_fn_from_config(config, sde, train=True, optimize_fn=optimize_fn,
                                             return_terms=True)
  eval_step_fn = losses.step_fn_from_config(config, sde, train=False, optimize_fn=optimize_fn,
                                            return_terms=True)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  shape = _sample_shape(config, settings['batch_size'])
  sampling_fn = None
  if settings['snapshot_sampling']:
    sampling_fn = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sde.sampling_eps)

  meta_path = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
  if os.path.exists(meta_path):
    # Strict: a checkpoint that does not fit the model raises here, before training touches the workdir.
    state = utils.restore_checkpoint(meta_path, state, config.device)
    logging.info('Resuming from %s at step %d.', meta_path, int(state['step']))
    # Seeded with the step, so a resumed run does not replay the noise of the run it resumes.
    torch.manual_seed(config.seed + int(state['step']))
  else:
    logging.info('No checkpoint at %s: training starts from a fresh initialization.', meta_path)

  uniform_dequantization = utils.check_bool('data.uniform_dequantization', config.data.uniform_dequantization)
  train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=uniform_dequantization)
  if isinstance(train_ds, toy.ToyStream):
    # The toy stream is a fixed function of the seed: continue it at the resumed step rather than replay the
    # batches already trained on (tf.data pipelines reshuffle on every start instead, as in Score SDE).
    train_ds = train_ds.from_batch(int(state['step']))
  iterators = {'train': iter(train_ds), 'eval': iter(eval_ds)}
  # Read one batch now, so that data that do not fit the model stop the run before anything is written.
  first_batch = _to_model_input(_next_batch(iterators, 'train', train_ds), config, scaler)
  _check_batch_shape(first_batch, shape, 'training')

  return types.SimpleNamespace(
      config=config, settings=settings, sde=sde, state=state, train_step_fn=train_step_fn,
      eval_step_fn=eval_step_fn, terms=_active_terms(config), scaler=scaler, sampling_fn=sampling_fn,
      train_ds=train_ds, eval_ds=eval_ds, iterators=iterators, pending_batch=first_batch, meta_path=meta_path,
      checkpoint_dir=os.path.join(workdir, 'checkpoints'), sample_dir=os.path.join(workdir, 'samples'),
      tb_dir=os.path.join(workdir, 'tensorboard'), monitor=NonFiniteLossMonitor(config.device))


def _make_workdir(run):
  """Creates the workdir's folders and the TensorBoard writer (the first writes of a training run)."""
  for path in (run.checkpoint_dir, os.path.dirname(run.meta_path), run.sample_dir, run.tb_dir):
    os.makedirs(path, exist_ok=True)
  # Lazy: torch.utils.tensorboard imports TensorFlow when it is installed; by now the data pipeline has
  # configured TensorFlow to stay off the GPU.
  from torch.utils import tensorboard
  return tensorboard.SummaryWriter(run.tb_dir)


class NonFiniteLossMonitor:
  """Remembers the first step whose training loss was NaN or infinite, without a host-device sync.

  `update` runs every step with device-side ops only; `check` reads the flag (one sync) and is called at
  `log_freq` and before every checkpoint save, so no checkpoint is ever written after a non-finite loss.
  """

  def __init__(self, device):
    self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

  def update(self, loss, step):
    bad = ~torch.isfinite(loss) & (self._first_bad_step < 0)
    self._first_bad_step = torch.where(bad, torch.full_like(self._first_bad_step, step), self._first_bad_step)

  def check(self):
    first_bad_step = int(self._first_bad_step)
    if first_bad_step >= 0:
      raise FloatingPointError(
          f'The training loss is not finite (NaN or inf) at step {first_bad_step}; training stopped. The '
          f'checkpoints written before that step are intact; lower optim.lr or check the data.')


def _log_terms(writer, prefix, terms, names, step):
  """Logs the loss terms `names` to TensorBoard and returns them as floats (the loop's only `.item()` calls)."""
  values = {name: terms[name].item() for name in names}
  for name, value in values.items():
    tag = {'loss': 'training_loss'}.get(name, name) if prefix == 'train' else f'eval_{name}'
    writer.add_scalar(tag, value, step)
  return values


def _format_terms(values):
  return ', '.join(f'{name}: {value:.5e}' for name, value in values.items())


def _save_checkpoints(run, step):
  """Writes the preemption checkpoint and the snapshot due at `step`; returns whether a snapshot was written."""
  s = run.settings
  final = step == s['n_iters']
  due_meta = final or step % s['preemption_freq'] == 0
  due_snapshot = final or step % s['snapshot_freq'] == 0
  if due_meta or due_snapshot:
    run.monitor.check()
  if due_meta:
    utils.save_checkpoint(run.meta_path, run.state)
  if due_snapshot:
    path = os.path.join(run.checkpoint_dir, f'checkpoint_{step // s["snapshot_freq"]}.pth')
    utils.save_checkpoint(path, run.state)
    logging.info('step: %d, saved %s', step, path)
  return due_snapshot


def _save_sample_snapshot(run, step):
  sample = _sample_with_ema(run.sampling_fn, run.state)
  this_sample_dir = os.path.join(run.sample_dir, f'iter_{step}')
  os.makedirs(this_sample_dir, exist_ok=True)
  path_np = os.path.join(this_sample_dir, 'sample.np')
  path_png = os.path.join(this_sample_dir, 'sample.png')
  if _is_toy(run.config):
    _snapshot_points(run.config, sample, path_np, path_png, step)
  else:
    _snapshot_images(sample, path_np, path_png)


def _eval_step(run, writer, step):
  batch = _to_model_input(_next_batch(run.iterators, 'eval', run.eval_ds), run.config, run.scaler)
  values = _log_terms(writer, 'eval', run.eval_step_fn(run.state, batch), run.terms, step)
  logging.info('step: %d, eval_loss: %.5e (%s)', step, values['loss'], _format_terms(values))


def _training_loop(run, writer):
  s = run.settings
  initial_step = int(run.state['step'])
  logging.info('Starting training loop at step %d (n_iters %d).', initial_step, s['n_iters'])
  last_log_time, last_log_step = time.time(), initial_step
  while int(run.state['step']) < s['n_iters']:
    batch = run.pending_batch if run.pending_batch is not None else _to_model_input(
        _next_batch(run.iterators, 'train', run.train_ds), run.config, run.scaler)
    run.pending_batch = None
    terms = run.train_step_fn(run.state, batch)
    step = int(run.state['step'])  # the step fn has incremented it: `step` updates are done
    run.monitor.update(terms['loss'], step)
    if step % s['log_freq'] == 0:
      values = _log_terms(writer, 'train', terms, run.terms, step)
      now = time.time()
      steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      logging.info('step: %d, training_loss: %.5e (%s), %.3g steps/s', step, values['loss'],
                   _format_terms(values), steps_per_sec)
      run.monitor.check()
    if step % s['eval_freq'] == 0:
      _eval_step(run, writer, step)
    if _save_checkpoints(run, step) and run.sampling_fn is not None:
      _save_sample_snapshot(run, step)
  run.monitor.check()


def train(config, workdir):
  """Runs the training pipeline.

  Resumes from `workdir/checkpoints-meta/checkpoint.pth` when it exists (with its optimizer, EMA and step), so
  a released Score SDE checkpoint copied there is fine-tuned from its step. Resuming at or past
  `training.n_iters` logs so and returns.

  Args:
    config: Configuration to use.
    workdir: Working directory for checkpoints, samples and TensorBoard summaries.

  Raises:
    ValueError: a config value or the data do not fit; nothing was written to the workdir.
    utils.CheckpointError: the checkpoint does not fit the model; nothing was written to the workdir.
    FloatingPointError: the training loss became NaN or infinite; the error names the step. Checkpoints
      written before that step are intact.
  """
  run = _setup_training(config, workdir)
  step = int(run.state['step'])
  if step >= run.settings['n_iters']:
    logging.info('The checkpoint is at step %d, at or past training.n_iters=%d: nothing to train.', step,
                 run.settings['n_iters'])
    return
  writer = _make_workdir(run)
  try:
    _training_loop(run, writer)
  finally:
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
  )
  settings['end_ckpt'] = utils.check_number('eval.end_ckpt', e.end_ckpt, low=settings['begin_ckpt'],
                                            integer=True)
  return settings


def _save_npz(path, *unnamed, **named):
  """Writes an .npz atomically (a reader polling the folder never sees half a file)."""
  with utils.atomic_write(path) as fout:
    np.savez_compressed(fout, *unnamed, **named)


def wait_for_checkpoint(path, poll_seconds=None, limit_seconds=None):
  """Waits until `path` exists, as Score SDE's evaluation waits for training to write a checkpoint.

  Args:
    path: the checkpoint file.
    poll_seconds: seconds between checks; default `CHECKPOINT_POLL_SECONDS`.
    limit_seconds: give up after this many seconds; default `CHECKPOINT_WAIT_LIMIT_SECONDS` (None: forever).

  Raises:
    TimeoutError: the checkpoint did not appear within `limit_seconds`.
  """
  poll_seconds = CHECKPOINT_POLL_SECONDS if poll_seconds is None else poll_seconds
  limit_seconds = CHECKPOINT_WAIT_LIMIT_SECONDS if limit_seconds is None else limit_seconds
  start = time.time()
  logged = False
  while not os.path.exists(path):
    waited = time.time() - start
    if limit_seconds is not None and waited >= limit_seconds:
      raise TimeoutError(f'Checkpoint {path} did not appear within {limit_seconds:g} s.')
    if not logged:
      logging.warning('Waiting for %s: training has not written it yet (checking every %g s%s).', path,
                      poll_seconds, '' if limit_seconds is None else f', for at most {limit_seconds:g} s')
      logged = True
    time.sleep(poll_seconds if limit_seconds is None else max(0., min(poll_seconds, limit_seconds - waited)))


def _evaluate_loss(ctx, ckpt):
  """Eval loss over the whole eval split: Score SDE's `ckpt_{ckpt}_loss.npz`, plus the FP terms when on."""
  values = {name: [] for name in ctx.terms}
  for i, batch in enumerate(ctx.eval_ds):
    terms = ctx.eval_step_fn(ctx.state, _to_model_input(batch, ctx.config, ctx.scaler))
    for name in ctx.terms:
      values[name].append(terms[name].item())
    if (i + 1) % 1000 == 0:
      logging.info('Finished %dth step loss evaluation', i + 1)
  all_losses = np.asarray(values['loss'])
  arrays = dict(all_losses=all_losses, mean_loss=all_losses.mean())
  message = f'ckpt: {ckpt}, eval_loss: {all_losses.mean():.5e}'
  if len(ctx.terms) > 2:  # the FP regularizer is on: its terms, and the DSM loss they add to
    for name in ctx.terms[1:]:
      term = np.asarray(values[name])
      arrays[f'all_{name}'] = term
      arrays[f'mean_{name}'] = term.mean()
      message += f', {name}: {term.mean():.5e}'
  _save_npz(os.path.join(ctx.eval_dir, f'ckpt_{ckpt}_loss.npz'), **arrays)
  logging.info(message)


def _evaluate_bpd(ctx, ckpt):
  """Bits/dim over `eval.bpd_num_repeats` passes of the bpd split; Score SDE's per-batch files."""
  s = ctx.settings
  bpds = []
  # Score SDE's round id, batch_id + len(ds_bpd) * repeat, is the running count of batches.
  bpd_round_id = 0
  for repeat in range(s['bpd_num_repeats']):
    for batch_id, batch in enumerate(ctx.ds_bpd):
      bpd = ctx.likelihood_fn(ctx.state['model'], _to_model_input(batch, ctx.config, ctx.scaler))[0]
      bpd = bpd.detach().cpu().numpy().reshape(-1)
      bpds.extend(bpd)
      logging.info('ckpt: %d, repeat: %d, batch: %d, mean bpd: %6f', ckpt, repeat, batch_id,
                   np.mean(np.asarray(bpds)))
      # Score SDE's file holds this batch's bits/dim as the unnamed array `arr_0`; `all_bpds` adds all so far.
      _save_npz(os.path.join(ctx.eval_dir, f'{s["bpd_dataset"]}_ckpt_{ckpt}_bpd_{bpd_round_id}.npz'), bpd,
                all_bpds=np.asarray(bpds))
      bpd_round_id += 1
  # Standard error of the mean from the spread of the per-pass means (likelihood.bpd_summary; nan for 1 pass).
  mean, stderr = likelihood.bpd_summary(bpds, s['bpd_num_repeats']) if bpds else (float('nan'), float('nan'))
  logging.info('ckpt: %d, %s bits/dim over %d repeats: %.6f +- %.6f (standard error)', ckpt, s['bpd_dataset'],
               s['bpd_num_repeats'], mean, stderr)


def _image_metrics(ctx, ckpt, this_sample_dir, num_rounds):
  """IS, FID and KID of every round's Inception features against the dataset's statistics (Score SDE's)."""
  all_logits, all_pools = [], []
  for r in range(num_rounds):
    with np.load(os.path.join(this_sample_dir, f'statistics_{r}.npz'), allow_pickle=False) as stat:
      if not ctx.inceptionv3:
        all_logits.append(stat['logits'])
      all_pools.append(stat['pool_3'])
  n = ctx.settings['num_samples']
  all_pools = np.concatenate(all_pools, axis=0)[:n]
  all_logits = None if ctx.inceptionv3 else np.concatenate(all_logits, axis=0)[:n]
  data_pools = evaluation.load_dataset_stats(ctx.config)['pool_3']
  metrics = evaluation.sample_quality_metrics(data_pools, all_pools, all_logits)
  logging.info('ckpt-%d --- inception_score: %.6e, FID: %.6e, KID: %.6e', ckpt, metrics['is'], metrics['fid'],
               metrics['kid'])
  _save_npz(os.path.join(ctx.eval_dir, f'report_{ckpt}.npz'), IS=metrics['is'], fid=metrics['fid'],
            kid=metrics['kid'])


def _evaluate_samples(ctx, ckpt):
  """Samples in rounds of `eval.batch_size` (Score SDE's `ckpt_{ckpt}/samples_{r}.npz`), then their metrics."""
  s = ctx.settings
  this_sample_dir = os.path.join(ctx.eval_dir, f'ckpt_{ckpt}')
  os.makedirs(this_sample_dir, exist_ok=True)
  # ceil: Score SDE's num_samples // batch_size + 1 draws a useless extra round when they divide exactly.
  num_rounds = math.ceil(s['num_samples'] / s['batch_size'])
  toy_samples = []
  for r in range(num_rounds):
    logging.info('sampling -- ckpt: %d, round: %d', ckpt, r)
    samples, _ = ctx.sampling_fn(ctx.state['model'])
    if _is_toy(ctx.config):
      points = samples.reshape(samples.shape[0], -1).cpu().numpy()
      _save_npz(os.path.join(this_sample_dir, f'samples_{r}.npz'), samples=points)
      toy_samples.append(points)
      continue
    images = np.clip(samples.permute(0, 2, 3, 1).cpu().numpy() * 255., 0, 255).astype(np.uint8)
    _save_npz(os.path.join(this_sample_dir, f'samples_{r}.npz'), samples=images)
    # Garbage-collect before and after TensorFlow's Inception network, as Score SDE does.
    gc.collect()
    latents = evaluation.run_inception_distributed(images, ctx.inception_model, inceptionv3=ctx.inceptionv3)
    gc.collect()
    stats = dict(pool_3=latents['pool_3'])
    if not ctx.inceptionv3:
      stats['logits'] = latents['logits']
    _save_npz(os.path.join(this_sample_dir, f'statistics_{r}.npz'), **stats)
  if _is_toy(ctx.config):
    metrics = toy.sample_quality(np.concatenate(toy_samples, axis=0)[:s['num_samples']], ctx.config)
    logging.info('ckpt-%d --- %s', ckpt, _format_terms(metrics))
    _save_npz(os.path.join(ctx.eval_dir, f'report_{ckpt}.npz'), **metrics)
  else:
    _image_metrics(ctx, ckpt, this_sample_dir, num_rounds)


def _evaluate_fp_residual(ctx, ckpt):
  """The score-FPE residual as a function of t on `eval.fp_residual_num_batches` eval batches.

  Writes `ckpt_{ckpt}_fp_residual.npz` with the arrays of `score_fpe.residual_vs_time` over the t grid:
  `t`, `residual`, `residual_weighted`, `scalar`, `time_derivative`.
  """
  s = ctx.settings
  batches = []
  for batch in ctx.eval_ds:
    if len(batches) == s['fp_residual_num_batches']:
      break
    batches.append(_to_model_input(batch, ctx.config, ctx.scaler))
  if len(batches) < s['fp_residual_num_batches']:
    logging.warning('eval.fp_residual_num_batches=%d, but the eval split has only %d batches.',
                    s['fp_residual_num_batches'], len(batches))
  score_fn = mutils.get_score_fn(ctx.sde, ctx.state['model'], train=False, continuous=ctx.continuous)
  ts = np.linspace(ctx.sde.sampling_eps, ctx.sde.T, s['fp_residual_num_times'])
  # The training run's estimators (`training.fp_*`), so the diagnostic measures what the loss penalizes.
  curves = score_fpe.residual_vs_time(score_fn, ctx.sde, torch.cat(batches), ts, fpe=ctx.fpe,
                                      fp_wgt_type=ctx.config.training.fp_wgt_type, m=ctx.config.training.m,
                                      batch_size=s['batch_size'])
  _save_npz(os.path.join(ctx.eval_dir, f'ckpt_{ckpt}_fp_residual.npz'), **curves)
  logging.info('ckpt: %d, score-FPE residual vs t: %s', ckpt,
               ', '.join(f't={t:.3g}: {r:.4e}' for t, r in zip(curves['t'], curves['residual'])))


def _setup_evaluation(config, workdir, eval_folder):
  """Builds and validates everything evaluation needs; writes nothing."""
  settings = _eval_settings(config)
  utils.check_number('seed', config.seed, low=0, integer=True)
  sde = sde_lib.sde_from_config(config)
  state = _build_state(config)
  continuous = utils.check_bool('training.continuous', config.training.continuous)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  uniform_dequantization = utils.check_bool('data.uniform_dequantization', config.data.uniform_dequantization)
  _, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=uniform_dequantization, evaluation=True)
  ctx = types.SimpleNamespace(
      config=config, settings=settings, sde=sde, state=state, continuous=continuous, scaler=scaler,
      eval_ds=eval_ds, terms=_active_terms(config), eval_step_fn=None, ds_bpd=None, likelihood_fn=None,
      sampling_fn=None, inception_model=None, inceptionv3=False, fpe=None,
      checkpoint_dir=os.path.join(workdir, 'checkpoints'), eval_dir=os.path.join(workdir, eval_folder))
  if settings['enable_loss']:
    ctx.eval_step_fn = losses.step_fn_from_config(config, sde, train=False,
                                                  optimize_fn=losses.optimization_manager(config),
                                                  return_terms=True)
  if settings['enable_bpd']:
    # Images: uniformly dequantized 8-bit data, Score SDE's discrete bits/dim and its Rademacher trace
    # estimator. Toy data are continuous and 2-D: the density's own bits/dim, no dequantization, and the
    # exact trace (2 backward passes), so the NLL has no estimator noise.
    discrete = not _is_toy(config)
    train_bpd, eval_bpd, _ = datasets.get_dataset(config, uniform_dequantization=discrete, evaluation=True)
    ctx.ds_bpd = train_bpd if settings['bpd_dataset'] == 'train' else eval_bpd
    ctx.likelihood_fn = likelihood.likelihood_fn_from_config(
        config, sde, inverse_scaler, hutchinson_type='Rademacher' if discrete else 'exact', discrete_data=discrete)
  if settings['enable_fp_residual']:
    if not continuous:
      # A discrete-time model sees t only through its rounded noise-level index: d_t s is zero or a jump.
      raise ValueError('eval.enable_fp_residual=True needs a continuous-time model (training.continuous=True); '
                       'the score of a discrete-time model is not differentiable in t.')
    # training.fp_wgt_type and training.m were validated with the other FP fields by _active_terms above.
    ctx.fpe = score_fpe.fpe_from_config(config, sde, eps=sde.sampling_eps)
  if settings['enable_sampling']:
    shape = _sample_shape(config, settings['batch_size'])
    ctx.sampling_fn = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sde.sampling_eps)
    if not _is_toy(config):
      # Score SDE: Inception-v3 pool features (no logits, IS = -1) for images of 256 pixels or more.
      ctx.inceptionv3 = evaluation.inceptionv3_from_config(config)
      ctx.inception_model = evaluation.get_inception_model(inceptionv3=ctx.inceptionv3, config=config)
      # The statistics file must exist before hours of sampling, not after.
      evaluation.load_dataset_stats(config)
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
      `time_derivative`).

  Args:
    config: Configuration to use.
    workdir: Working directory holding `checkpoints/`.
    eval_folder: The subfolder for storing evaluation results.
  """
  ctx = _setup_evaluation(config, workdir, eval_folder)
  os.makedirs(ctx.eval_dir, exist_ok=True)
  s = ctx.settings
  logging.info('Evaluating checkpoints %d..%d into %s.', s['begin_ckpt'], s['end_ckpt'], ctx.eval_dir)
  for ckpt in range(s['begin_ckpt'], s['end_ckpt'] + 1):
    ckpt_path = os.path.join(ctx.checkpoint_dir, f'checkpoint_{ckpt}.pth')
    wait_for_checkpoint(ckpt_path)
    # Checkpoints are written atomically (utils.save_checkpoint), so a file that exists is complete: Score
    # SDE's retries after a failed read are not needed, and a checkpoint that does not fit raises.
    ctx.state = utils.restore_checkpoint(ckpt_path, ctx.state, config.device)
    ctx.state['ema'].copy_to(ctx.state['model'].parameters())
    logging.info('ckpt: %d (step %d) loaded from %s', ckpt, int(ctx.state['step']), ckpt_path)
    # Reproducible: every checkpoint is evaluated with the same noise (Score SDE does not seed).
    torch.manual_seed(config.seed)
    if s['enable_loss']:
      _evaluate_loss(ctx, ckpt)
    if s['enable_bpd']:
      _evaluate_bpd(ctx, ckpt)
    if s['enable_sampling']:
      _evaluate_samples(ctx, ckpt)
    if s['enable_fp_residual']:
      _evaluate_fp_residual(ctx, ckpt)
