"""DSM vs DSM + FP fine-tuning on scikit-learn's digits (issue 13, "Real images, offline"), on CPU.

    python digits_study.py --workdir W [--sde ve] [--seeds 0 1 2] [--jobs 2]

For each SDE (`ve`: the small NCSN++ of configs/digits/ve_ncsnpp_continuous.py; `vp`: the small DDPM++):
  1. pretrain with DSM (`main.py --mode train`, configs/digits/<sde>_..._continuous.py), and evaluate the
     pretrained checkpoint (`main.py --mode eval`);
  2. choose alpha and beta on training data only (`balanced_weights`): at the pretrained weights, on
     `ALPHA_BATCHES` training batches, the FP terms together equal the DSM term of the fine-tuning loss, split
     evenly between the vector and the scalar term;
  3. fine-tune the pretrained checkpoint (configs/digits/fp_<sde>_..._continuous.py) with DSM alone
     (alpha = beta = 0) and with DSM + FP, one run per seed, and evaluate each fine-tuned checkpoint: test
     bits/dim for 17 levels, sample metrics (`datasets.DigitsData`), the score-FPE residual vs t and, where
     `eval.enable_conservativity` exists, the conservativity vs t.
Every command is a `main.py` command line run under `nice` with one thread (OMP_NUM_THREADS=1); each one's
wall time is recorded. Results go to `W/digits_study.json`: the commands and durations, per run `sde`,
`variant`, `alpha`, `beta`, `seed`, `nll_bpd`, `fp_residual_mean`, `conservativity` (None where not measured)
and the sample metrics, and per (sde, variant) the mean and 95% interval over seeds.
"""

import argparse
import concurrent.futures
import functools
import glob
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {'ve': 'configs/digits/ve_ncsnpp_continuous.py', 'vp': 'configs/digits/vp_ddpmpp_continuous.py'}
FINE_TUNING_CONFIGS = {'ve': 'configs/digits/fp_ve_ncsnpp_continuous.py',
                       'vp': 'configs/digits/fp_vp_ddpmpp_continuous.py'}
# Training batches the FP weights are balanced on (batch 64 each).
ALPHA_BATCHES = 4
# Evaluation batches of 120 test images (3 bits/dim batches over the 360; one sampling round of 120): the ODE
# solve of bits/dim (Score SDE's tolerances) dominates the study's time on CPU.
EVAL_OVERRIDES = {'eval.batch_size': 120, 'eval.num_samples': 120}
# Student's t quantiles t_{0.975, n - 1} for the 95% interval of a mean over n seeds.
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}


def _printable(args):
  return 'OMP_NUM_THREADS=1 python main.py ' + ' '.join(args)


def _logged_seconds(log_path):
  """Seconds between the first and the last absl log line of a `main.py` log (same day)."""
  stamps = []
  with open(log_path) as f:
    for line in f:
      if line[:1] in 'IWE' and line[1:5].isdigit():
        h, m, sec = line.split()[1].split(':')
        stamps.append(int(h) * 3600 + int(m) * 60 + float(sec))
  return stamps[-1] - stamps[0]


def _wait_for_trainer(workdir):
  """Waits while a live trainer (e.g. of an interrupted study) holds the workdir's lock."""
  import preemption  # pylint: disable=g-import-not-at-top
  while preemption.trainer_status(workdir)[0]:
    time.sleep(10)


def run_command(args, log_path):
  """Runs `python main.py <args>` under nice with one thread; returns (command string, seconds)."""
  command = ['nice', '-n', '10', sys.executable, 'main.py'] + args
  env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', TF_NUM_INTRAOP_THREADS='1',
             TF_NUM_INTEROP_THREADS='1', CUDA_VISIBLE_DEVICES='')
  start = time.time()
  with open(log_path, 'w') as log:
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
  seconds = time.time() - start
  printable = _printable(args)
  if result.returncode:
    raise RuntimeError(f'{printable} failed with exit status {result.returncode}; see {log_path}.')
  return printable, seconds


def main_args(config, workdir, mode, overrides):
  return ([f'--config={config}', f'--workdir={workdir}', f'--mode={mode}'] +
          [f'--config.{k}={v}' for k, v in overrides.items()])


def eval_overrides(has_conservativity):
  overrides = {}
  if has_conservativity:
    # 8 Rademacher probes per sample (the exact Jacobian takes 64 backward passes per batch and t).
    overrides.update({'eval.enable_conservativity': True, 'eval.conservativity_num_probes': 8})
  return overrides


def read_results(workdir, ckpt):
  """The numbers `main.py --mode eval` wrote for checkpoint `ckpt` in `workdir/eval`."""
  eval_dir = os.path.join(workdir, 'eval')
  bpd_files = sorted(glob.glob(os.path.join(eval_dir, f'test_ckpt_{ckpt}_bpd_*.npz')),
                     key=lambda p: int(p.rsplit('_', 1)[1][:-4]))
  bpds = np.load(bpd_files[-1])['all_bpds']
  residual = np.load(os.path.join(eval_dir, f'ckpt_{ckpt}_fp_residual.npz'))
  out = {'nll_bpd': float(np.mean(bpds)), 'fp_residual_mean': float(np.mean(residual['residual'])),
         'fp_residual_vs_t': {'t': residual['t'].tolist(), 'residual': residual['residual'].tolist()}}
  report = np.load(os.path.join(eval_dir, f'report_{ckpt}.npz'))
  out.update({name: float(report[name]) for name in report.files})
  out['conservativity'] = None
  if 'conservativity' in residual.files:
    out['conservativity'] = float(np.mean(residual['conservativity']))
    out['conservativity_vs_t'] = residual['conservativity'].tolist()
  return out


def balanced_weights(fine_tuning_config, checkpoint):
  """alpha, beta such that, at the pretrained weights and on training data, alpha R_vec = beta R_sc = DSM / 2.

  Measured with the fine-tuning loss (likelihood weighting, FP terms on `training.fp_batch_fraction` of each
  batch, the training reductions) on `ALPHA_BATCHES` training batches of seed 0; only training images are
  read.
  """
  sys.path.insert(0, ROOT)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  import datasets  # pylint: disable=g-import-not-at-top
  import distributed  # pylint: disable=g-import-not-at-top
  import losses  # pylint: disable=g-import-not-at-top
  import run_lib  # pylint: disable=g-import-not-at-top
  import sde_lib  # pylint: disable=g-import-not-at-top
  import utils  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,unused-import
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('ft_config', os.path.join(ROOT, fine_tuning_config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.device = torch.device('cpu')
  config.seed = 0
  config.training.alpha = config.training.beta = 1.
  sde = sde_lib.sde_from_config(config)
  state = utils.restore_checkpoint(checkpoint, run_lib._build_state(config), config.device)  # pylint: disable=protected-access
  loss = losses.loss_from_config(config, sde)
  batches = datasets.get_data(config).train_batches(0, distributed.context())
  generator = torch.Generator().manual_seed(0)
  sums = {}
  for _ in range(ALPHA_BATCHES):
    batch = next(batches)
    noise = loss.draw_noise(batch.shape, batch.device, batch.dtype, generator)
    reduced = loss.reduce(loss(state['model'], batch, train=False, noise=noise), batch.shape[0])
    for name, value in reduced.items():
      sums[name] = sums.get(name, 0.) + float(value.detach()) / ALPHA_BATCHES
  return {'alpha': 0.5 * sums['dsm'] / sums['fp_vector'], 'beta': 0.5 * sums['dsm'] / sums['fp_scalar'],
          'terms_at_start': sums}


def summarize(runs):
  """Mean and 95% interval (Student's t over seeds) per (sde, variant) and metric."""
  groups = {}
  for run in runs:
    groups.setdefault((run['sde'], run['variant']), []).append(run)
  summary = []
  for (sde, variant), members in sorted(groups.items()):
    row = {'sde': sde, 'variant': variant, 'num_seeds': len(members)}
    for metric in ('nll_bpd', 'fp_residual_mean', 'conservativity', 'mmd', 'digit_score'):
      values = np.array([m[metric] for m in members if m.get(metric) is not None], dtype=np.float64)
      if not values.size:
        continue
      half = (T_975[len(values)] * values.std(ddof=1) / math.sqrt(len(values))
              if 1 < len(values) <= max(T_975) else float('nan'))
      row[metric] = {'mean': float(values.mean()), 'ci95': float(half)}
    summary.append(row)
  return summary


def study_sde(sde, workdir, seeds, jobs, has_conservativity, record, done):
  """Pretraining, weights, fine-tuning and evaluation of one SDE; appends to `record`. `done`: the commands of an
  earlier study in the same workdir, by what they did."""
  base = os.path.join(workdir, sde)
  pretrain = os.path.join(base, 'pretrain')
  os.makedirs(pretrain, exist_ok=True)
  checkpoint = os.path.join(pretrain, 'checkpoints', 'checkpoint_1.pth')  # the state at the last step
  what = f'{sde} DSM pretraining'
  train_args = main_args(CONFIGS[sde], pretrain, 'train', {})
  _wait_for_trainer(pretrain)
  if os.path.exists(checkpoint):
    # A study rerun in the same workdir keeps a finished pretraining; its duration is read from its log.
    record['commands'].append(done.get(what) or {'what': what, 'command': _printable(train_args),
                                                 'seconds': _logged_seconds(os.path.join(base, 'pretrain_train.log'))})
  else:
    command, seconds = run_command(train_args, os.path.join(base, 'pretrain_train.log'))
    record['commands'].append({'what': what, 'command': command, 'seconds': seconds})
  logging.info('%s: %.0f s', what, record['commands'][-1]['seconds'])
  _write(workdir, record)

  start = time.time()
  weights = balanced_weights(FINE_TUNING_CONFIGS[sde], checkpoint)
  record['weights'][sde] = dict(weights, seconds=time.time() - start)
  logging.info('%s FP weights: %s', sde, record['weights'][sde])

  def evaluate_pretrained():
    overrides = dict(EVAL_OVERRIDES, **eval_overrides(has_conservativity))
    command = run_command(main_args(CONFIGS[sde], pretrain, 'eval', overrides),
                          os.path.join(base, 'pretrain_eval.log'))
    record['pretrained'][sde] = read_results(pretrain, 1)
    logging.info('%s pretrained: %s', sde, {k: v for k, v in record['pretrained'][sde].items() if 'vs_t' not in k})
    return None, [command]

  def fine_tune(variant, seed):
    run_dir = os.path.join(base, f'{variant}_seed{seed}')
    os.makedirs(os.path.join(run_dir, 'checkpoints-meta'), exist_ok=True)
    shutil.copyfile(checkpoint, os.path.join(run_dir, 'checkpoints-meta', 'checkpoint.pth'))
    overrides = {'seed': seed}
    if variant == 'dsm':
      overrides.update({'training.alpha': 0., 'training.beta': 0.})
    else:
      overrides.update({'training.alpha': weights['alpha'], 'training.beta': weights['beta']})
    commands = []
    commands.append(run_command(main_args(FINE_TUNING_CONFIGS[sde], run_dir, 'train', overrides),
                                os.path.join(run_dir, 'train.log')))
    overrides.update(EVAL_OVERRIDES)
    overrides.update(eval_overrides(has_conservativity))
    commands.append(run_command(main_args(FINE_TUNING_CONFIGS[sde], run_dir, 'eval', overrides),
                                os.path.join(run_dir, 'eval.log')))
    ckpt = int(os.path.basename(max(glob.glob(os.path.join(run_dir, 'checkpoints', 'checkpoint_*.pth')),
                                    key=os.path.getmtime))[len('checkpoint_'):-4])
    result = {'sde': sde, 'variant': variant, 'seed': seed, 'alpha': overrides['training.alpha'],
              'beta': overrides['training.beta'], 'train_seconds': commands[0][1], 'eval_seconds': commands[1][1]}
    result.update(read_results(run_dir, ckpt))
    return result, commands

  # The pretrained model's evaluation runs beside the fine-tuning runs.
  tasks = [evaluate_pretrained] + [functools.partial(fine_tune, variant, seed)
                                   for seed in seeds for variant in ('fp', 'dsm')]
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    for result, commands in pool.map(_failures_logged, tasks):
      if commands is None:
        record.setdefault('failures', []).append(result)
        continue
      if result is None:
        record['commands'].append({'what': f'{sde} evaluation of the pretrained model', 'command': commands[0][0],
                                   'seconds': commands[0][1]})
        continue
      record['runs'].append(result)
      for (command, seconds), what in zip(commands, ('fine-tuning', 'evaluation')):
        record['commands'].append({'what': f'{sde} {result["variant"]} seed {result["seed"]} {what}',
                                   'command': command, 'seconds': seconds})
      logging.info('%s %s seed %d: bpd %.4f, residual %.4g, conservativity %s (%.0f + %.0f s)', sde,
                   result['variant'], result['seed'], result['nll_bpd'], result['fp_residual_mean'],
                   result['conservativity'], result['train_seconds'], result['eval_seconds'])
      _write(workdir, record)


def _failures_logged(task):
  """Runs a task; a failed one returns (its error message, None) instead of stopping the other runs."""
  try:
    return task()
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('A study task failed.')
    return str(e), None


def _write(workdir, record):
  record['summary'] = summarize(record['runs'])
  path = os.path.join(workdir, 'digits_study.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--sde', nargs='+', default=['ve'], choices=sorted(CONFIGS))
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  parser.add_argument('--jobs', type=int, default=3, help='fine-tuning runs at a time')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  sys.path.insert(0, ROOT)
  from configs.fp_defaults import add_fp_diffusion_fields  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  probe = add_fp_diffusion_fields(ml_collections.ConfigDict(
      {'training': {}, 'sampling': {}, 'eval': {}, 'data': {}}))
  has_conservativity = 'enable_conservativity' in probe.eval
  os.makedirs(args.workdir, exist_ok=True)
  previous = os.path.join(args.workdir, 'digits_study.json')
  done = {}
  if os.path.exists(previous):
    with open(previous) as f:
      done = {c['what']: c for c in json.load(f)['commands']}
  record = {'started': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), 'seeds': args.seeds,
            'conservativity_measured': has_conservativity, 'commands': [], 'pretrained': {}, 'weights': {},
            'runs': []}
  start = time.time()
  for sde in args.sde:
    study_sde(sde, args.workdir, args.seeds, args.jobs, has_conservativity, record, done)
  record['total_seconds'] = time.time() - start
  _write(args.workdir, record)
  logging.info('Wrote %s (%.0f s).', os.path.join(args.workdir, 'digits_study.json'), record['total_seconds'])


if __name__ == '__main__':
  main()
