"""The regularizer study on the demo's 2-D density (`python study.py --workdir W [--quick]`).

FP-Diffusion fine-tunes a converged DSM checkpoint with DSM + alpha * (score-FPE residual). This module
fine-tunes the demo's converged checkpoint (`demo.pretrain`, once per SDE, reused by every run) over a grid of
alpha that includes 0 (DSM alone) and spans several orders of magnitude, for the VE and the VP SDE, with several
seeds, and evaluates every run as the demo does (`demo.fine_tune_and_evaluate`). It also runs the ablations
that plausibly decide the outcome, at the demo's alpha: the time weighting `fp_wgt_type`, the scalar term on,
EMA off during fine-tuning. And it measures how large the FP term is next to the DSM loss at the start of
fine-tuning.

Writes `W/study.json` (`{'runs': [...], 'start_terms': {...}, 'settings': {...}}`), a table of means and 95%
t-intervals over seeds (to the log and `W/study.md`), and `W/study.png` (NLL and residual against alpha).
Each run's numbers are saved in its workdir (`study_run.json`): running the study again skips finished runs.
"""

import json
import logging
import math
import os
import time

from absl import app
from absl import flags
import numpy as np
import torch

import checkpoints
import datasets
import demo
import run_lib
import sde_lib
import toy
import utils

FLAGS = flags.FLAGS

ALPHAS = (0., 1e-4, 1e-3, 1e-2, 1e-1, 1.)
SEEDS = (0, 1, 2)
# The demo's alpha, fixed before any study result was seen: the ablations are run there.
ABLATION_ALPHA = 0.01
# name -> (config overrides, whether the alpha = 0 run changes too). The baseline is the demo's FP config:
# fp_wgt_type 'll', vector term only, EMA 0.999.
ABLATIONS = {
    'wgt_constant': ({'training.fp_wgt_type': 'constant'}, False),
    'wgt_convention': ({'training.fp_wgt_type': 'convention'}, False),
    # The released code's scalar term, with the vector term's weight (beta = alpha).
    'scalar_on': ({'training.scalar_fp': 'both', 'training.beta': ABLATION_ALPHA}, False),
    # EMA off: the evaluated weights are the fine-tuned ones alone, not 61% pretraining (0.999^500 = 0.61).
    'no_ema': ({'model.ema_rate': 0.}, True),
}
# Evaluation sizes of the full study (the demo's: 2000 samples, 20 times), see docs/study.md.
EVAL_SIZES = {'eval.num_samples': 1000, 'eval.fp_residual_num_times': 10}
QUICK_ALPHAS = (0., 1.)
QUICK_SEEDS = (0, 1)
# Draws of t and noise for the start-of-fine-tuning term sizes.
START_TERM_DRAWS = 10
# What each run saves (`demo.read_results`' numbers), and what the summary reports (plus the gap to the true NLL).
RUN_METRICS = ('nll_bpd', 'fp_residual_mean', 'conservativity', 'swd', 'mmd', 'dsm_loss')
METRICS = ('nll_bpd', 'nll_gap_bpd', 'nll_vs_dsm_bpd', 'fp_residual_mean', 'conservativity', 'conservativity_vs_dsm',
           'swd', 'mmd', 'dsm_loss')


def _set(config, dotted, value):
  section, field = dotted.split('.')
  if field not in config[section]:
    raise KeyError(f'config.{dotted} does not exist: an ablation may only change existing fields.')
  config[section][field] = value


def plan_runs(sdes=demo.SDES, alphas=ALPHAS, seeds=SEEDS, ablations=ABLATIONS, ablation_sdes=demo.SDES,
              ablation_seeds=SEEDS):
  """The runs of the study: the alpha grid for every SDE and seed, then the ablations.

  Returns:
    a list of dicts with 'sde', 'alpha', 'seed', 'ablation' (None for the alpha grid).
  """
  runs = [dict(sde=sde, alpha=float(alpha), seed=seed, ablation=None)
          for sde in sdes for alpha in alphas for seed in seeds]
  for name, (_, changes_dsm) in ablations.items():
    ablation_alphas = (0., ABLATION_ALPHA) if changes_dsm else (ABLATION_ALPHA,)
    runs += [dict(sde=sde, alpha=alpha, seed=seed, ablation=name)
             for sde in ablation_sdes for alpha in ablation_alphas for seed in ablation_seeds]
  return runs


def run_name(run):
  return f'{run["sde"]}_alpha{run["alpha"]:g}_seed{run["seed"]}' + (f'_{run["ablation"]}' if run['ablation'] else '')


def run_config(run, toy_name, quick):
  """The config of one run: the demo's FP config of `run['sde']` (the demo's fine-tuning: from the pretrained
  checkpoint's step to its `training.n_iters`) with the run's alpha, seed and ablation, and the study's smaller
  evaluation sizes (with `quick`, the demo's tiny sizes)."""
  config = demo.get_demo_config(run['sde'], 'fp', toy_name, quick)
  config.training.alpha = run['alpha']
  # The seed draws the fine-tuning's data and noise, and the test set (toy.get_toy_datasets).
  config.seed = run['seed']
  if not quick:
    for dotted, value in EVAL_SIZES.items():
      _set(config, dotted, value)
  if run['ablation']:
    for dotted, value in ABLATIONS[run['ablation']][0].items():
      _set(config, dotted, value)
  return config


def execute_run(run, workdir, pretrain_dir, toy_name, quick):
  """Fine-tunes and evaluates one run, or reads its numbers if a previous study finished it.

  Returns:
    the run's dict with the metrics added (and 'seconds', the time it took when it ran).
  """
  model_dir = os.path.join(workdir, run_name(run))
  result_path = os.path.join(model_dir, 'study_run.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  start = time.time()
  config = run_config(run, toy_name, quick)
  numbers = demo.fine_tune_and_evaluate(config, pretrain_dir, model_dir)
  result = dict(run, **{key: numbers[key] for key in RUN_METRICS}, seconds=time.time() - start)
  with checkpoints.atomic_write(result_path) as f:  # a crash never leaves a half-written result to skip over
    f.write(json.dumps(demo.nan_to_none(result), indent=1).encode())
  return result


def start_terms(config, pretrain_dir, num_draws=START_TERM_DRAWS):
  """How large the FP terms are next to the DSM loss at the start of fine-tuning.

  The eval step of `config` (its alpha, weighting and terms) on the pretrained checkpoint's EMA weights and the
  test set, over `num_draws` draws of t and noise after `torch.manual_seed(0)`.

  Returns:
    dict: term name ('dsm', 'fp_vector', 'fp_scalar' where computed) -> {'mean', 'min', 'max'} over the draws.
  """
  sde = sde_lib.sde_from_config(config)
  state = run_lib.build_state(config)
  utils.restore_checkpoint(os.path.join(pretrain_dir, 'checkpoints-meta', 'checkpoint.pth'), state, config.device)
  trainer = run_lib.make_trainer(config, sde, state)
  data = datasets.get_data(config)
  torch.manual_seed(0)
  draws = {}
  for _ in range(num_draws):
    for _, batch in data.eval_batches('test'):
      for name, value in trainer.eval_step(state, batch).items():
        if name != 'loss':
          draws.setdefault(name, []).append(float(value))
  return {name: {'mean': float(np.mean(v)), 'min': float(np.min(v)), 'max': float(np.max(v))}
          for name, v in draws.items()}


def measure_start_terms(pretrain_dirs, toy_name, quick):
  """`start_terms` of each SDE's pretrained checkpoint, with the baseline FP settings and each ablation's
  (EMA off changes nothing at the start: the pretrained EMA weights are evaluated either way)."""
  out = {}
  for sde, pretrain_dir in pretrain_dirs.items():
    out[sde] = {}
    for ablation in (None, 'wgt_constant', 'wgt_convention', 'scalar_on'):
      run = dict(sde=sde, alpha=ABLATION_ALPHA, seed=0, ablation=ablation)
      config = run_config(run, toy_name, quick)
      out[sde][ablation or 'baseline'] = start_terms(config, pretrain_dir, num_draws=1 if quick else START_TERM_DRAWS)
  return out


def add_nll_gaps(runs, toy_name, quick):
  """Adds 'nll_gap_bpd' to each run: its NLL minus the true density's on the same test set (the seed draws the
  test set; NaN for a density without a closed form)."""
  true_nll = {}
  for run in runs:
    if run['seed'] not in true_nll:
      config = demo.get_demo_config(run['sde'], 'fp', toy_name, quick)
      config.seed = run['seed']
      true_nll[run['seed']] = demo.reference_row(config)['nll_bpd']
    run['nll_gap_bpd'] = run['nll_bpd'] - true_nll[run['seed']]


def add_paired_differences(runs):
  """Adds 'nll_vs_dsm_bpd' and 'conservativity_vs_dsm' to each run: its value minus that of DSM fine-tuning alone
  (alpha = 0, no ablation) with the same SDE and seed, so the same test set and training noise (NaN without
  that run). Paired differences remove the spread between the seeds' test sets from the comparison."""
  dsm = {(r['sde'], r['seed']): r for r in runs if r['alpha'] == 0 and not r['ablation']}
  for run in runs:
    base = dsm.get((run['sde'], run['seed']))
    for metric, name in (('nll_bpd', 'nll_vs_dsm_bpd'), ('conservativity', 'conservativity_vs_dsm')):
      ok = base is not None and run[metric] is not None and base[metric] is not None
      run[name] = run[metric] - base[metric] if ok else float('nan')


def summarize(runs):
  """Groups runs by (sde, ablation, alpha) and takes mean and 95% t-interval of every metric over seeds.

  Returns:
    a list of dicts: 'sde', 'ablation', 'alpha', 'n' (seeds), and per metric `(mean, half_width)`.
  """
  groups = {}
  for run in runs:
    groups.setdefault((run['sde'], run['ablation'] or '', run['alpha']), []).append(run)
  rows = []
  for (sde, ablation, alpha), members in sorted(groups.items()):
    row = dict(sde=sde, ablation=ablation or None, alpha=alpha, n=len(members))
    for metric in METRICS:
      values = [m[metric] for m in members if m.get(metric) is not None]
      row[metric] = utils.t_interval(values)
    rows.append(row)
  return rows


def _cell(mean_hw, fmt):
  mean, hw = mean_hw
  if math.isnan(mean):
    return '-'
  return f'{mean:{fmt}}' if math.isnan(hw) else f'{mean:{fmt}} ± {hw:{fmt}}'


def format_table(rows, true_nll=None):
  """A markdown table of `summarize`'s rows: mean ± 95% t-interval half-width over seeds."""
  headers = ['SDE', 'setting', 'alpha', 'seeds', 'NLL [bits/dim]', 'NLL - true', 'NLL - DSM', 'FP residual',
             'conservativity', 'conserv. - DSM', 'SWD', 'MMD^2', 'DSM loss']
  fmts = ('.4f', '.4f', '.4f', '.3g', '.3g', '.2g', '.4f', '.2e', '.4f')
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + ' --- |' * len(headers)]
  for row in rows:
    cells = [row['sde'].upper(), row['ablation'] or 'baseline', f'{row["alpha"]:g}', str(row['n'])]
    cells += [_cell(row[metric], fmt) for metric, fmt in zip(METRICS, fmts)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if true_nll is not None and not math.isnan(true_nll):
    lines.append(f'\nTrue NLL of the density on the seed-42 test set: {true_nll:.4f} bits/dim ("NLL - true": on '
                 'each seed\'s own test set; "- DSM": paired difference with DSM fine-tuning alone, alpha = 0, same '
                 'seed).')
  return '\n'.join(lines)


def plot_study(rows, path, true_nll=None):
  """NLL, the mean residual and conservativity against alpha (log x; alpha = 0 drawn a decade left of the
  smallest alpha, past a dotted break), one column per SDE, with 95% intervals over seeds: the alpha grid's runs
  only."""
  plt = toy.pyplot()
  grid = [r for r in rows if r['ablation'] is None]
  sdes = sorted({r['sde'] for r in grid})
  fig, axes = plt.subplots(3, len(sdes), figsize=(5 * len(sdes), 10), squeeze=False)
  nonzero = sorted({r['alpha'] for r in grid if r['alpha'] > 0})
  zero_x = nonzero[0] / 10 if nonzero else 1.
  for col, sde in enumerate(sdes):
    mine = sorted((r for r in grid if r['sde'] == sde), key=lambda r: r['alpha'])
    xs = [r['alpha'] if r['alpha'] > 0 else zero_x for r in mine]
    for ax, metric, label in ((axes[0, col], 'nll_bpd', 'NLL [bits/dim]'),
                              (axes[1, col], 'fp_residual_mean', 'score-FPE residual (mean over t)'),
                              (axes[2, col], 'conservativity', 'conservativity (mean over t)')):
      means = np.array([r[metric][0] for r in mine])
      hws = np.nan_to_num(np.array([r[metric][1] for r in mine]))
      ax.errorbar(xs, means, yerr=hws, fmt='o-', capsize=3)
      ax.set_xscale('log')
      ax.axvline(math.sqrt(zero_x * nonzero[0]) if nonzero else zero_x, color='grey', ls=':', lw=1)
      ticks = [zero_x] + nonzero
      ax.set_xticks(ticks)
      ax.set_xticklabels(['0'] + [f'{a:g}' for a in nonzero])
      ax.minorticks_off()
      ax.set_ylabel(label)
      ax.set_xlabel('alpha')
      if metric == 'nll_bpd' and true_nll is not None and not math.isnan(true_nll):
        ax.axhline(true_nll, color='k', ls='--', lw=1, label='true density')
        ax.legend()
      if metric == 'fp_residual_mean':
        ax.set_yscale('log')
    axes[0, col].set_title(f'{sde.upper()} SDE (mean ± 95% interval over seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run_study(workdir, toy_name, quick=False, pretrain_iters=None, ablation_sdes=demo.SDES, shard=(0, 1)):
  """Pretrains (once per SDE), runs every planned fine-tuning, writes study.json, study.md and study.png.

  Args:
    workdir: output folder; runs in `workdir/{run_name}`, pretraining as in the demo.
    toy_name: one of `toy.TOY_DENSITIES`.
    quick: tiny sizes and a small grid (seconds): to test the pipeline.
    pretrain_iters: DSM steps of the shared checkpoints (`--pretrain_iters`, as the demo's; None: each SDE's own).
    ablation_sdes: the SDEs the ablations run for.
    shard: (i, n): this process runs the planned runs whose index is i modulo n, so that n processes (started
      once pretraining is done) share the study; whichever finds every run finished writes the outputs.

  Returns:
    the dict written to study.json, or None if runs of other shards are still missing.
  """
  start = time.time()
  index, num_shards = shard
  if not 0 <= index < num_shards:
    raise ValueError(f'--study_shard={index}/{num_shards}: the shard must be in 0..{num_shards - 1}.')
  unknown = set(ablation_sdes) - set(demo.SDES)
  if unknown:
    raise ValueError(f'--study_ablation_sdes={list(ablation_sdes)} has {sorted(unknown)}; allowed: {list(demo.SDES)}.')
  os.makedirs(workdir, exist_ok=True)
  if quick:
    planned = plan_runs(alphas=QUICK_ALPHAS, seeds=QUICK_SEEDS, ablation_sdes=('ve',), ablation_seeds=(0,))
  else:
    planned = plan_runs(ablation_sdes=ablation_sdes)
  pretrain_dirs, pretrain_steps = {}, {}
  for sde in demo.SDES:
    pretrain_dirs[sde], pretrain_steps[sde] = demo.pretrain(workdir, sde, toy_name, quick, pretrain_iters)
  terms = measure_start_terms(pretrain_dirs, toy_name, quick)
  for i, run in enumerate(planned):
    if i % num_shards == index:
      logging.info('study run %d/%d: %s (%.0f s so far)', i + 1, len(planned), run_name(run), time.time() - start)
      execute_run(run, workdir, pretrain_dirs[run['sde']], toy_name, quick)
  missing = [run_name(r) for r in planned if not os.path.exists(os.path.join(workdir, run_name(r), 'study_run.json'))]
  if missing:
    logging.info('Shard %d/%d done; %d runs of other shards still missing (%s, ...): the last shard writes the '
                 'study.', index, num_shards, len(missing), missing[0])
    return None
  runs = [execute_run(run, workdir, None, toy_name, quick) for run in planned]  # reads the saved results
  add_nll_gaps(runs, toy_name, quick)
  add_paired_differences(runs)
  rows = summarize(runs)
  true_nll = demo.reference_row(demo.get_demo_config('ve', 'fp', toy_name, quick))['nll_bpd']
  result = {'runs': runs, 'start_terms': terms, 'summary': rows,
            'settings': {'toy': toy_name, 'quick': quick, 'pretrain_iters': pretrain_steps,
                         'n_iters': {sde: demo.get_demo_config(sde, 'fp', toy_name, quick).training.n_iters
                                     for sde in demo.SDES},
                         'ablation_alpha': ABLATION_ALPHA,
                         'true_nll_bpd': true_nll, 'seconds': time.time() - start}}
  with checkpoints.atomic_write(os.path.join(workdir, 'study.json')) as f:  # shards may finish together
    f.write(json.dumps(demo.nan_to_none(result), indent=1).encode())
  table = format_table(rows, true_nll)
  term_lines = format_start_terms(terms)
  with open(os.path.join(workdir, 'study.md'), 'w') as f:
    f.write(f'# Study on {toy_name}: mean ± 95% t-interval over seeds\n\n{table}\n\n{term_lines}\n')
  plot_study(rows, os.path.join(workdir, 'study.png'), true_nll)
  logging.info('Study table (mean ± 95%% t-interval over seeds):\n%s\n%s', table, term_lines)
  logging.info('Study written to %s (study.json, study.md, study.png) in %.0f s.', workdir, time.time() - start)
  return result


def format_start_terms(terms):
  """Lines comparing the FP terms with the DSM loss at the start of fine-tuning (before the alpha weight)."""
  lines = ['At the start of fine-tuning (pretrained EMA weights, test set; mean [min, max] over draws; the FP '
           'terms before their weight alpha or beta):', '']
  for sde, settings in terms.items():
    for setting, values in settings.items():
      parts = [f'{name} {v["mean"]:.3g} [{v["min"]:.3g}, {v["max"]:.3g}]' for name, v in values.items()]
      lines.append(f'- {sde.upper()}, {setting}: ' + ', '.join(parts))
  return '\n'.join(lines)


def define_flags():
  """The demo's flags (`demo.define_flags`: --workdir, --toy, --quick, --pretrain_iters) and the study's own."""
  demo.define_flags()
  flags.DEFINE_list('study_ablation_sdes', list(demo.SDES), 'The SDEs the ablations run for.')
  flags.DEFINE_string('study_shard', '0/1', 'i/n runs every n-th run from the i-th, to share the study between n '
                      'processes started after pretraining.')


def main(argv):
  del argv
  demo.configure_process()
  shard = FLAGS.study_shard.split('/')
  if len(shard) != 2 or not all(part.isdigit() for part in shard):
    raise ValueError(f'--study_shard={FLAGS.study_shard!r} is not of the form i/n (e.g. 0/2).')
  run_study(FLAGS.workdir, FLAGS.toy, FLAGS.quick, FLAGS.pretrain_iters,
            ablation_sdes=tuple(FLAGS.study_ablation_sdes), shard=tuple(int(part) for part in shard))


if __name__ == '__main__':
  define_flags()
  app.run(main)
