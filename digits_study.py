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
wall time is read from its log. A rerun keeps what is done (the pretraining, a run with results) and runs the
rest; `--collect` only writes the outputs from the workdir. Results go to `W/digits_study.json` (the same as
tables in `W/digits_study.md`): the commands and durations, per run `sde`,
`variant`, `alpha`, `beta`, `seed`, `nll_bpd`, `fp_residual_mean`, `conservativity` (None where not measured)
and the sample metrics, and per (sde, variant) the mean and 95% interval over seeds.
"""

import argparse
import concurrent.futures
import functools
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np

import datasets
import study

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {'ve': 'configs/digits/ve_ncsnpp_continuous.py', 'vp': 'configs/digits/vp_ddpmpp_continuous.py'}
FINE_TUNING_CONFIGS = {'ve': 'configs/digits/fp_ve_ncsnpp_continuous.py',
                       'vp': 'configs/digits/fp_vp_ddpmpp_continuous.py'}
# Training batches the FP weights are balanced on (batch 64 each).
ALPHA_BATCHES = 4
# Evaluation batches of 120 test images (3 bits/dim batches over the 360; one sampling round of 120): the ODE
# solve of bits/dim (Score SDE's tolerances) dominates the study's time on CPU.
EVAL_OVERRIDES = {'eval.batch_size': 120, 'eval.num_samples': 120}


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
  # The plain residual's mean over t is dominated by the smallest t; the lambda(t)-weighted one (what the loss
  # penalizes) is reported beside it.
  out = {'nll_bpd': float(np.mean(bpds)), 'fp_residual_mean': float(np.mean(residual['residual'])),
         'fp_residual_weighted_mean': float(np.mean(residual['residual_weighted'])),
         'fp_residual_vs_t': {'t': residual['t'].tolist(), 'residual': residual['residual'].tolist(),
                              'residual_weighted': residual['residual_weighted'].tolist()}}
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
  import distributed  # pylint: disable=g-import-not-at-top
  import losses  # pylint: disable=g-import-not-at-top
  import run_lib  # pylint: disable=g-import-not-at-top
  import sde_lib  # pylint: disable=g-import-not-at-top
  import utils  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('ft_config', os.path.join(ROOT, fine_tuning_config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.device = torch.device('cpu')
  config.seed = 0
  config.training.alpha = config.training.beta = 1.
  sde = sde_lib.sde_from_config(config)
  state = utils.restore_checkpoint(checkpoint, run_lib.build_state(config), config.device)
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
  """Mean and 95% interval (Student's t over seeds, `study.t_interval`) per (sde, variant) and metric."""
  groups = {}
  for run in runs:
    groups.setdefault((run['sde'], run['variant']), []).append(run)
  summary = []
  for (sde, variant), members in sorted(groups.items()):
    row = {'sde': sde, 'variant': variant, 'num_seeds': len(members)}
    for metric in ('nll_bpd', 'fp_residual_mean', 'fp_residual_weighted_mean', 'conservativity', 'mmd',
                   'digit_score'):
      values = np.array([m[metric] for m in members if m.get(metric) is not None], dtype=np.float64)
      if not values.size:
        continue
      mean, half = study.t_interval(values)
      row[metric] = {'mean': mean, 'ci95': half}
    summary.append(row)
  return summary


def real_image_metrics(num_images=120):
  """The sample metrics of `num_images` real training images (a fixed draw), as a reference for the models'."""
  sys.path.insert(0, ROOT)
  import torch  # pylint: disable=g-import-not-at-top
  from configs.digits.ve_ncsnpp_continuous import get_config  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.device = torch.device('cpu')
  images = datasets.load_digits_splits()['train'][0]
  chosen = images[np.random.default_rng(0).choice(len(images), num_images, replace=False)]
  arrays = np.clip(chosen.astype(np.float64) / 16. * 255., 0, 255).astype(np.uint8)
  return datasets.DigitsData(config).sample_quality([(arrays, None)], num_images)


def _fine_tuning_args(sde, run_dir, variant, seed, weights, has_conservativity):
  """The `main.py` arguments of one fine-tuning run and of its evaluation."""
  overrides = {'seed': seed}
  if variant == 'dsm':
    overrides.update({'training.alpha': 0., 'training.beta': 0.})
  else:
    overrides.update({'training.alpha': weights['alpha'], 'training.beta': weights['beta']})
  train_args = main_args(FINE_TUNING_CONFIGS[sde], run_dir, 'train', overrides)
  overrides.update(EVAL_OVERRIDES)
  overrides.update(eval_overrides(has_conservativity))
  return train_args, main_args(FINE_TUNING_CONFIGS[sde], run_dir, 'eval', overrides), overrides


def fine_tune(workdir, sde, variant, seed, has_conservativity):
  """Fine-tunes the pretrained checkpoint of `sde` (one variant, one seed) and evaluates it."""
  base = os.path.join(workdir, sde)
  with open(os.path.join(base, 'fp_weights.json')) as f:
    weights = json.load(f)
  run_dir = os.path.join(base, f'{variant}_seed{seed}')
  os.makedirs(os.path.join(run_dir, 'checkpoints-meta'), exist_ok=True)
  shutil.copyfile(os.path.join(base, 'pretrain', 'checkpoints', 'checkpoint_1.pth'),
                  os.path.join(run_dir, 'checkpoints-meta', 'checkpoint.pth'))
  train_args, eval_args, _ = _fine_tuning_args(sde, run_dir, variant, seed, weights, has_conservativity)
  run_command(train_args, os.path.join(run_dir, 'train.log'))
  run_command(eval_args, os.path.join(run_dir, 'eval.log'))


def collect(workdir, sde, seeds, has_conservativity, record):
  """Reads what the commands of one SDE wrote (results, and durations from their logs) into `record`."""
  base = os.path.join(workdir, sde)
  pretrain = os.path.join(base, 'pretrain')
  record['commands'].append({'what': f'{sde} DSM pretraining', 'command': _printable(main_args(
      CONFIGS[sde], pretrain, 'train', {})), 'seconds': _logged_seconds(os.path.join(base, 'pretrain_train.log'))})
  with open(os.path.join(base, 'fp_weights.json')) as f:
    record['weights'][sde] = weights = json.load(f)
  record['commands'].append({'what': f'{sde} FP weights on training data (balanced_weights)', 'command':
                             f'python -c "import digits_study; digits_study.balanced_weights(...)"',
                             'seconds': weights['seconds']})
  eval_log = os.path.join(base, 'pretrain_eval.log')
  if os.path.exists(os.path.join(pretrain, 'eval', 'report_1.npz')):
    record['commands'].append({'what': f'{sde} evaluation of the pretrained model', 'command': _printable(main_args(
        CONFIGS[sde], pretrain, 'eval', dict(EVAL_OVERRIDES, **eval_overrides(has_conservativity)))),
                               'seconds': _logged_seconds(eval_log)})
    record['pretrained'][sde] = read_results(pretrain, 1)
  for seed in seeds:
    for variant in ('dsm', 'fp'):
      run_dir = os.path.join(base, f'{variant}_seed{seed}')
      train_args, eval_args, overrides = _fine_tuning_args(sde, run_dir, variant, seed, weights, has_conservativity)
      checkpoints = glob.glob(os.path.join(run_dir, 'checkpoints', 'checkpoint_*.pth'))
      # The residual file is the last one an evaluation writes.
      if not checkpoints or not glob.glob(os.path.join(run_dir, 'eval', 'ckpt_*_fp_residual.npz')):
        logging.warning('%s: not finished; left out.', run_dir)
        continue
      seconds = {}
      for what, args, log in (('fine-tuning', train_args, 'train.log'), ('evaluation', eval_args, 'eval.log')):
        seconds[what] = _logged_seconds(os.path.join(run_dir, log))
        record['commands'].append({'what': f'{sde} {variant} seed {seed} {what}', 'command': _printable(args),
                                   'seconds': seconds[what]})
      ckpt = int(os.path.basename(max(checkpoints, key=os.path.getmtime))[len('checkpoint_'):-4])
      result = {'sde': sde, 'variant': variant, 'seed': seed, 'alpha': overrides['training.alpha'],
                'beta': overrides['training.beta'], 'train_seconds': seconds['fine-tuning'],
                'eval_seconds': seconds['evaluation']}
      result.update(read_results(run_dir, ckpt))
      record['runs'].append(result)


def study_sde(sde, workdir, seeds, jobs, has_conservativity):
  """Pretraining (kept if done), FP weights, the pretrained model's evaluation and the fine-tuning runs of one
  SDE (those not evaluated yet), `jobs` at a time."""
  base = os.path.join(workdir, sde)
  pretrain = os.path.join(base, 'pretrain')
  os.makedirs(pretrain, exist_ok=True)
  checkpoint = os.path.join(pretrain, 'checkpoints', 'checkpoint_1.pth')  # the state at the last step
  _wait_for_trainer(pretrain)
  if not os.path.exists(checkpoint):
    run_command(main_args(CONFIGS[sde], pretrain, 'train', {}), os.path.join(base, 'pretrain_train.log'))
  weights_path = os.path.join(base, 'fp_weights.json')
  if not os.path.exists(weights_path):
    start = time.time()
    weights = balanced_weights(FINE_TUNING_CONFIGS[sde], checkpoint)
    weights['seconds'] = time.time() - start
    with open(weights_path, 'w') as f:
      json.dump(weights, f, indent=1)
  tasks = []
  if not os.path.exists(os.path.join(pretrain, 'eval', 'report_1.npz')):
    overrides = dict(EVAL_OVERRIDES, **eval_overrides(has_conservativity))
    tasks.append(functools.partial(run_command, main_args(CONFIGS[sde], pretrain, 'eval', overrides),
                                   os.path.join(base, 'pretrain_eval.log')))
  for seed in seeds:
    for variant in ('fp', 'dsm'):
      if not glob.glob(os.path.join(base, f'{variant}_seed{seed}', 'eval', 'ckpt_*_fp_residual.npz')):
        tasks.append(functools.partial(fine_tune, workdir, sde, variant, seed, has_conservativity))
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    failures = [error for error, ok in pool.map(_failures_logged, tasks) if ok is None]
  return failures


def _failures_logged(task):
  """Runs a task; a failed one returns (its error message, None) instead of stopping the other runs."""
  try:
    return task(), True
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('A study task failed.')
    return str(e), None


def paired_differences(runs):
  """Per SDE and metric: DSM + FP minus DSM alone, seed by seed (same data order, loss noise, dequantization and
  probes), with the mean and 95% interval over the seeds both variants finished."""
  by_key = {(r['sde'], r['variant'], r['seed']): r for r in runs}
  out = {}
  for sde in sorted({r['sde'] for r in runs}):
    seeds = sorted(s for (e, v, s) in by_key if e == sde and v == 'fp' and (sde, 'dsm', s) in by_key)
    rows = {}
    for metric in ('nll_bpd', 'conservativity', 'fp_residual_mean'):
      values = [by_key[(sde, 'fp', s)][metric] - by_key[(sde, 'dsm', s)][metric] for s in seeds
                if by_key[(sde, 'fp', s)].get(metric) is not None and by_key[(sde, 'dsm', s)].get(metric) is not None]
      if values:
        mean, half = study.t_interval(values)
        rows[metric] = {'per_seed': values, 'mean': mean, 'ci95': half}
    out[sde] = {'seeds': seeds, 'metrics': rows}
  return out


def _number(value, digits):
  if value is None:
    return '-'
  return f'{value:.{digits}f}' if value == 0 or abs(value) >= 10 ** -digits else f'{value:.2e}'


def format_report(record):
  """The study as markdown: per run, per variant (mean ± 95% interval), paired differences, curves vs t, and
  the commands with their durations."""
  metrics = (('nll_bpd', 'test bits/dim (17 levels)', 4), ('fp_residual_mean', 'FP residual, mean over t', 1),
             ('fp_residual_weighted_mean', 'weighted residual', 2), ('conservativity', 'conservativity', 4),
             ('mmd', 'mmd', 4), ('digit_score', 'digit score', 3))
  lines = [f'# DIGITS study ({record["written"]})', '']
  for sde in sorted({r['sde'] for r in record['runs']} | set(record['pretrained'])):
    weights = record['weights'].get(sde, {})
    lines += [f'## {sde.upper()}', '', f'FP weights (training data, pretrained weights): alpha = '
              f'{weights.get("alpha", float("nan")):.4g}, beta = {weights.get("beta", float("nan")):.4g}; terms '
              f'at the start: {weights.get("terms_at_start")}.', '',
              '| model | seed | ' + ' | '.join(m[1] for m in metrics) + ' | fine-tuning s | eval s |',
              '| --- ' * (len(metrics) + 4) + '|']
    rows = [('pretrained (DSM)', '-', record['pretrained'][sde], None, None)] if sde in record['pretrained'] else []
    rows += [('DSM fine-tuning' if r['variant'] == 'dsm' else 'DSM + FP', r['seed'], r, r['train_seconds'],
              r['eval_seconds']) for r in sorted(record['runs'], key=lambda r: (r['variant'], r['seed']))
             if r['sde'] == sde]
    for name, seed, r, train_s, eval_s in rows:
      cells = [_number(r.get(key), digits) for key, _, digits in metrics]
      lines.append(f'| {name} | {seed} | ' + ' | '.join(cells) + f' | {_number(train_s, 0)} | {_number(eval_s, 0)} |')
    lines += ['', 'Mean ± 95% interval (Student\'s t) over seeds:', '',
              '| variant | seeds | ' + ' | '.join(m[1] for m in metrics) + ' |', '| --- ' * (len(metrics) + 2) + '|']
    for row in record['summary']:
      if row['sde'] == sde:
        cells = [f'{row[key]["mean"]:.{digits}f} ± {row[key]["ci95"]:.{digits}f}' if key in row else '-'
                 for key, _, digits in metrics]
        lines.append(f'| {row["variant"]} | {row["num_seeds"]} | ' + ' | '.join(cells) + ' |')
    paired = record.get('paired', {}).get(sde)
    if paired and paired['metrics']:
      lines += ['', f'Paired by seed ({paired["seeds"]}), DSM + FP minus DSM:', '']
      for key, values in paired['metrics'].items():
        per_seed = ', '.join(f'{v:+.4f}' for v in values['per_seed'])
        lines.append(f'- {key}: {per_seed} (mean {values["mean"]:+.4f} ± {values["ci95"]:.4f})')
    for curve, label in (('conservativity_vs_t', 'Conservativity'), ('fp_residual_vs_t', 'Score-FPE residual')):
      lines += _curve_table(record, sde, curve, label)
  lines += ['', '## Commands', '', '| what | command | seconds |', '| --- | --- | --- |']
  lines += [f'| {c["what"]} | `{c["command"]}` | {c["seconds"]:.0f} |' for c in record['commands']]
  return '\n'.join(lines) + '\n'


def _curve_table(record, sde, curve, label):
  """A curve against t (mean over seeds per model) as a markdown table."""
  models = [('pretrained', [record['pretrained'][sde]] if sde in record['pretrained'] else [])]
  models += [(name, [r for r in record['runs'] if r['sde'] == sde and r['variant'] == variant])
             for variant, name in (('dsm', 'DSM fine-tuning'), ('fp', 'DSM + FP'))]
  models = [(name, runs) for name, runs in models if runs and all(curve in r for r in runs)]
  if not models:
    return []
  t = models[0][1][0]['fp_residual_vs_t']['t']
  values = lambda r: r[curve]['residual'] if curve == 'fp_residual_vs_t' else r[curve]
  lines = ['', f'{label} against t (mean over seeds):', '', '| t | ' + ' | '.join(f'{x:.3g}' for x in t) + ' |',
           '| --- ' * (len(t) + 1) + '|']
  for name, runs in models:
    mean = np.mean([values(r) for r in runs], axis=0)
    lines.append(f'| {name} | ' + ' | '.join(f'{v:.3g}' for v in mean) + ' |')
  return lines


def _write(workdir, record):
  """Writes `W/digits_study.json` and `W/digits_study.md`, each atomically (`checkpoints.atomic_write`)."""
  sys.path.insert(0, ROOT)
  import checkpoints  # pylint: disable=g-import-not-at-top
  record['summary'] = summarize(record['runs'])
  record['paired'] = paired_differences(record['runs'])
  with checkpoints.atomic_write(os.path.join(workdir, 'digits_study.json')) as f:
    f.write(json.dumps(record, indent=1).encode())
  with checkpoints.atomic_write(os.path.join(workdir, 'digits_study.md')) as f:
    f.write(format_report(record).encode())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--sde', nargs='+', default=['ve'], choices=sorted(CONFIGS))
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  parser.add_argument('--jobs', type=int, default=3, help='fine-tuning runs at a time')
  parser.add_argument('--collect', action='store_true',
                      help='run nothing: write digits_study.json and .md from what the commands wrote in the workdir')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  sys.path.insert(0, ROOT)
  from configs.fp_defaults import add_fp_diffusion_fields  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  probe = add_fp_diffusion_fields(ml_collections.ConfigDict(
      {'training': {}, 'sampling': {}, 'eval': {}, 'data': {}}))
  has_conservativity = 'enable_conservativity' in probe.eval
  os.makedirs(args.workdir, exist_ok=True)
  failures = []
  if not args.collect:
    for sde in args.sde:
      failures += study_sde(sde, args.workdir, args.seeds, args.jobs, has_conservativity)
  record = {'written': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), 'seeds': args.seeds,
            'conservativity_measured': has_conservativity, 'commands': [], 'pretrained': {}, 'weights': {},
            'runs': [], 'failures': failures}
  record['real_training_images'] = real_image_metrics()
  for sde in args.sde:
    collect(args.workdir, sde, args.seeds, has_conservativity, record)
  _write(args.workdir, record)
  logging.info('Wrote %s (and digits_study.md).', os.path.join(args.workdir, 'digits_study.json'))


if __name__ == '__main__':
  main()
