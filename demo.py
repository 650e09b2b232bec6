"""The embedded demo: denoising score matching with and without the score Fokker-Planck regularizer, in 2-D.

For the VE and the VP SDE, trains an MLP score model on a 2-D toy density with DSM alone and with DSM +
score-FPE (`configs/toy/{ve,vp}_{dsm,fp}.py`), through `run_lib.train` and `run_lib.evaluate` (the code path of
image models). As FP-Diffusion fine-tunes pretrained Score SDE checkpoints, both variants start from one DSM
checkpoint (`--pretrain_iters` steps, trained once per SDE) and train on to `training.n_iters`: the runs share
their initialization, data and noise, and differ only by the FP term. Then prints one table per SDE:
  - NLL: bits/dim of the test set under the probability-flow ODE (exact divergence), with the true density's
    own value where it has a closed form;
  - the score-FPE residual of the learned score, averaged over the evaluation's t grid;
  - sample quality of probability-flow ODE samples against the true density (sliced Wasserstein distance and
    squared MMD; the "true samples" row is the value for a fresh sample of the density itself, the noise floor);
  - the DSM part of the evaluation loss.
and writes figures to the workdir: `residual_vs_t_{ve,vp}.png` and `samples_{ve,vp}.png`, plus `results.json`.

Offline, on one CPU thread, in about 3 minutes once .venv exists (docs/demo.md has the measured times):
  python demo.py --workdir demo_out [--toy checkerboard] [--quick]
Training resumes from (or skips to the end of) the checkpoints already in the workdir; evaluation is redone.
"""

import importlib
import json
import logging
import math
import os
import shutil
import time

from absl import app
from absl import flags
import numpy as np
import torch

import checkpoints
import run_lib
import toy
import utils

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags; defined only when run as a script, so that importing this module next to main.py
  (which defines --workdir too) does not clash in absl's global flag registry."""
  flags.DEFINE_string('workdir', 'demo_out', 'Folder for checkpoints, evaluation files, figures and results.json.')
  flags.DEFINE_enum('toy', 'gmm', list(toy.TOY_DENSITIES), 'The 2-D density.')
  flags.DEFINE_bool('quick', False, 'Tiny sizes (seconds, meaningless numbers): to test the pipeline.')
  flags.DEFINE_integer('pretrain_iters', None, 'DSM steps of the checkpoint both variants are fine-tuned from, '
                       'for both SDEs; the configs\' training.n_iters is the total. Default: each SDE config\'s '
                       f'training.n_iters minus {FINE_TUNE_ITERS} (VE 3000, VP 6000).')

SDES = ('ve', 'vp')
# Fine-tuning steps after the shared DSM checkpoint, by default: each SDE's pretraining is its config's
# training.n_iters minus these (VE 3000 steps, VP 6000: the VP model needs twice the steps to converge).
FINE_TUNE_ITERS = 500
VARIANTS = (('dsm', 'DSM'), ('fp', 'DSM + FP'))
CKPT = 1  # the toy configs write one snapshot, at the end of training


def shrink_for_quick_run(config):
  """Tiny sizes for `--quick`: every stage runs, in seconds; the numbers mean nothing."""
  training = config.training
  training.n_iters = 10
  training.snapshot_freq = 10
  training.snapshot_freq_for_preemption = 10
  training.log_freq = 5
  training.eval_freq = 10
  training.batch_size = 32
  config.model.nf = 16
  config.model.num_layers = 1
  config.eval.batch_size = 64
  config.eval.num_samples = 64
  config.eval.fp_residual_num_times = 3


def get_demo_config(sde, variant, toy_name, quick):
  """The config of one demo model: `configs/toy/{sde}_{variant}.py` on the density `toy_name`."""
  config = importlib.import_module(f'configs.toy.{sde}_{variant}').get_config()
  config.data.toy = toy_name
  config.device = torch.device('cpu')
  if quick:
    shrink_for_quick_run(config)
  return config


def copy_checkpoint(src_dir, dst_dir, ema_rate):
  """Starts `dst_dir`'s training from `src_dir`'s last checkpoint, as a released checkpoint is fine-tuned.

  A checkpoint carries its EMA decay, and restoring it overrides `model.ema_rate` (Score SDE's behaviour), so a
  fine-tuning run with another `ema_rate` (the study's EMA-off ablation) gets a copy with its own decay.
  """
  dst = os.path.join(dst_dir, 'checkpoints-meta', 'checkpoint.pth')
  if os.path.exists(dst):  # training resumes from where dst_dir already is
    return
  src = os.path.join(src_dir, 'checkpoints-meta', 'checkpoint.pth')
  checkpoint = checkpoints.load_checkpoint_file(src)
  if checkpoint['ema']['decay'] == ema_rate:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    return
  checkpoint['ema']['decay'] = ema_rate
  with checkpoints.atomic_write(dst) as f:
    torch.save(checkpoint, f)


def _check_pretrain_steps(pretrain_dir, pretrain_iters):
  """Refuses a workdir whose pretraining ran for another number of steps: the fine-tuned runs in it would not
  match `--pretrain_iters`."""
  meta = os.path.join(pretrain_dir, 'checkpoints-meta', 'checkpoint.pth')
  if os.path.exists(meta):
    step = int(checkpoints.load_checkpoint_file(meta)['step'])
    if step != pretrain_iters:
      raise ValueError(f'{pretrain_dir} was pretrained for {step} steps, not --pretrain_iters={pretrain_iters}; '
                       'use another --workdir.')


def read_results(config, eval_dir):
  """Collects what `run_lib.evaluate` wrote for checkpoint `CKPT` into floats and arrays.

  Reads exactly the files this config's evaluation writes, so files an earlier run with other sizes left in
  `eval_dir` are never mixed in.
  """
  # The last bits/dim file holds every value of the evaluation (`all_bpds`): toy_eval_batches per repeat.
  last_round = config.data.toy_eval_batches * config.eval.bpd_num_repeats - 1
  bpd_file = f'{config.eval.bpd_dataset}_ckpt_{CKPT}_bpd_{last_round}.npz'
  bpds = utils.read_npz(os.path.join(eval_dir, bpd_file))['all_bpds']
  loss = utils.read_npz(os.path.join(eval_dir, f'ckpt_{CKPT}_loss.npz'))
  residual = utils.read_npz(os.path.join(eval_dir, f'ckpt_{CKPT}_fp_residual.npz'))
  report = utils.read_npz(os.path.join(eval_dir, f'report_{CKPT}.npz'))
  num_rounds = math.ceil(config.eval.num_samples / config.eval.batch_size)
  samples = np.concatenate([utils.read_npz(os.path.join(eval_dir, f'ckpt_{CKPT}', f'samples_{r}.npz'))['samples']
                            .reshape(-1, 2) for r in range(num_rounds)])[:config.eval.num_samples]
  return {
      'nll_bpd': float(np.mean(bpds)),
      'fp_residual_mean': float(np.mean(residual['residual'])),
      # Relative asymmetry of the score's Jacobian (0 for a gradient field), mean over the same t grid.
      'conservativity': float(np.mean(residual['conservativity'])) if 'conservativity' in residual else float('nan'),
      'swd': float(report['swd']),
      'mmd': float(report['mmd']),
      # With the FP term on, the eval loss file also holds the DSM part alone; without it, the loss is DSM.
      'dsm_loss': float(loss['mean_dsm'] if 'mean_dsm' in loss else loss['mean_loss']),
      't': residual['t'].tolist(),
      'residual': np.asarray(residual['residual']).tolist(),
      'samples': samples,
  }


def reference_row(config):
  """The true density's own numbers: its NLL on the test set (closed forms only) and its sample-quality noise
  floor (a fresh sample of the density scored like the models' samples)."""
  _, eval_ds = toy.get_toy_datasets(config, evaluation=True)
  test_points = np.concatenate([np.asarray(batch['image']).reshape(-1, 2) for batch in eval_ds])
  try:
    nll = float(-np.mean(toy.log_density(config.data.toy, test_points)) / (2 * math.log(2.)))
  except NotImplementedError:
    nll = float('nan')
  fresh = toy.sample_toy(config.data.toy, config.eval.num_samples, np.random.default_rng([config.seed, 99]))
  quality = toy.sample_quality(fresh, config)
  return {'nll_bpd': nll, 'fp_residual_mean': float('nan'), 'conservativity': float('nan'), 'swd': quality['swd'],
          'mmd': quality['mmd'], 'dsm_loss': float('nan'), 'data': test_points}


def format_table(sde, toy_name, rows):
  """One SDE's table: a line per model, then the true density's row."""
  header = (f'{"model":<12}{"NLL [bits/dim]":>16}{"FP residual":>14}{"conserv.":>10}{"SWD":>10}{"MMD^2":>12}'
            f'{"DSM loss":>12}')
  lines = [f'{sde.upper()} SDE on {toy_name} (NLL from the probability-flow ODE; FP residual and conservativity '
           '||J - J^T|| / ||J||: mean over t; SWD, MMD^2 of ODE samples vs the true density; lower is better for '
           'all)', header, '-' * len(header)]

  def cell(value, width, fmt):
    return f'{"-":>{width}}' if value is None or math.isnan(value) else f'{value:>{width}{fmt}}'

  for label, r in rows.items():
    lines.append(f'{label:<12}' + cell(r['nll_bpd'], 16, '.4f') + cell(r['fp_residual_mean'], 14, '.4g') +
                 cell(r['conservativity'], 10, '.4f') +
                 cell(r['swd'], 10, '.4f') + cell(r['mmd'], 12, '.2e') + cell(r['dsm_loss'], 12, '.4f'))
  return '\n'.join(lines)


def pretrain(workdir, sde, toy_name, quick=False, pretrain_iters=None):
  """Trains (or resumes) the DSM checkpoint that every fine-tuning run of `sde` starts from.

  Returns:
    (the pretraining workdir `workdir/{toy}_{sde}_pretrain[_quick]`, its number of steps: `pretrain_iters`,
    by default the config's `training.n_iters` minus `FINE_TUNE_ITERS`, or half the tiny `n_iters` with `quick`).
  """
  config = get_demo_config(sde, 'dsm', toy_name, quick)
  n_iters = config.training.n_iters
  if quick:
    pretrain_iters = n_iters // 2
  elif pretrain_iters is None:
    pretrain_iters = n_iters - FINE_TUNE_ITERS
  if not 0 < pretrain_iters < n_iters:
    raise ValueError(f'--pretrain_iters={pretrain_iters} must be in (0, {n_iters}) (training.n_iters).')
  # The learning-rate schedule's horizon is this run's own length: pretraining ends converged.
  config.training.n_iters = pretrain_iters
  config.training.snapshot_freq = pretrain_iters
  pretrain_dir = os.path.join(workdir, f'{toy_name}_{sde}_pretrain{"_quick" if quick else ""}')
  _check_pretrain_steps(pretrain_dir, pretrain_iters)
  logging.info('%s SDE: DSM pretraining, %d steps in %s', sde.upper(), pretrain_iters, pretrain_dir)
  run_lib.train(config, pretrain_dir)
  return pretrain_dir, pretrain_iters


def fine_tune_and_evaluate(config, pretrain_dir, model_dir):
  """Fine-tunes `pretrain_dir`'s checkpoint to `config.training.n_iters` in `model_dir`, evaluates the last
  checkpoint there, and returns `read_results`'s numbers."""
  copy_checkpoint(pretrain_dir, model_dir, config.model.ema_rate)
  run_lib.train(config, model_dir)
  run_lib.evaluate(config, model_dir, eval_folder='eval')
  return read_results(config, os.path.join(model_dir, 'eval'))


def run_demo(workdir, toy_name, quick=False, pretrain_iters=None):
  """Trains and evaluates the four demo models, writes the figures and `results.json`, prints the tables.

  Args:
    workdir: output folder; each model trains in `workdir/{toy}_{sde}_{variant}` (`_quick` appended with
      `quick`), the shared DSM checkpoint in `workdir/{toy}_{sde}_pretrain`.
    toy_name: one of `toy.TOY_DENSITIES`.
    quick: tiny sizes (`shrink_for_quick_run`); `pretrain_iters` is then half the tiny `n_iters`.
    pretrain_iters: DSM steps before the variants split, less than the configs' `training.n_iters`; None: each
      SDE's own (`pretrain`).

  Returns:
    dict: sde -> label -> the row's numbers (floats), as in `results.json`.
  """
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  suffix = '_quick' if quick else ''
  stages = len(SDES) * (1 + len(VARIANTS))
  results, tables = {}, []
  stage = 0
  for sde in SDES:
    rows = {}
    stage += 1
    logging.info('[%d/%d] %s SDE: DSM pretraining (%.0f s so far)', stage, stages, sde.upper(), time.time() - start)
    pretrain_dir, sde_pretrain_iters = pretrain(workdir, sde, toy_name, quick, pretrain_iters)
    for variant, label in VARIANTS:
      stage += 1
      config = get_demo_config(sde, variant, toy_name, quick)
      model_dir = os.path.join(workdir, f'{toy_name}_{sde}_{variant}{suffix}')
      logging.info('[%d/%d] %s SDE, %s: fine-tuning steps %d..%d in %s, then evaluating (likelihood, samples, '
                   'score-FPE residual) (%.0f s so far)', stage, stages, sde.upper(), label, sde_pretrain_iters,
                   config.training.n_iters, model_dir, time.time() - start)
      rows[label] = fine_tune_and_evaluate(config, pretrain_dir, model_dir)
    reference = reference_row(config)
    toy.plot_residual_vs_time({label: (r['t'], r['residual']) for label, r in rows.items()},
                              os.path.join(workdir, f'residual_vs_t_{sde}.png'),
                              title=f'{sde.upper()} SDE on {toy_name}: score-FPE residual')
    toy.plot_samples(reference['data'], {label: r['samples'] for label, r in rows.items()},
                     os.path.join(workdir, f'samples_{sde}.png'),
                     title=f'{sde.upper()} SDE on {toy_name}: probability-flow ODE samples')
    rows['true samples'] = reference
    tables.append(format_table(sde, toy_name, rows))
    results[sde] = {label: {k: v for k, v in r.items() if k not in ('samples', 'data')}
                    for label, r in rows.items()}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    # NaN (no closed form, or not applicable) is written as null.
    json.dump(nan_to_none(results), f, indent=1)
  print('\n\n'.join(tables))
  print(f'\nFigures: {os.path.join(workdir, "residual_vs_t_{ve,vp}.png")}, '
        f'{os.path.join(workdir, "samples_{ve,vp}.png")}. Total time: {time.time() - start:.0f} s.')
  return results


def nan_to_none(value):
  """`value` (nested dicts, lists, tuples) with NaN floats as None (JSON null) and tuples as lists."""
  if isinstance(value, dict):
    return {k: nan_to_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [nan_to_none(v) for v in value]
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def configure_process():
  """The process settings of the demo and of the study (study.py): INFO logs, one torch thread."""
  logging.getLogger().setLevel(logging.INFO)
  # The MLP's ops are small: a second thread buys little and, next to other processes, costs a lot (measured
  # 5-10x slower steps with 2 threads on 2 busy cores).
  torch.set_num_threads(1)


def main(argv):
  del argv
  configure_process()
  run_demo(FLAGS.workdir, FLAGS.toy, FLAGS.quick, FLAGS.pretrain_iters)


if __name__ == '__main__':
  define_flags()
  app.run(main)
