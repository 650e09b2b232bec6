"""Fine-tuned against baseline: a paired comparison of two evaluation folders (`main.py --mode compare`).

`run_lib.evaluate` seeds every batch of the loss, every bits/dim pass's batch and every residual batch by its
index, so two models evaluated with the same config saw the same images and the same noise, batch for batch.
This module reads the result files of one checkpoint of each folder (the names are `run_lib.evaluate`'s), pairs
the bits/dim batch by batch, and writes into the fine-tuned folder:
  - `compare_{ckpt}_vs_{baseline_ckpt}.txt`: the table (also returned, for the log);
  - `compare_{ckpt}_vs_{baseline_ckpt}.json`: its numbers;
  - `compare_{ckpt}_vs_{baseline_ckpt}.png`: the score-FPE residual and the conservativity against t, both models.

Bits/dim of each model: the mean and standard error of `likelihood.bpd_summary` (over passes, as the eval log).
The paired difference (fine-tuned minus baseline) and its 95% interval (Student's t) are from the per-unit
differences: with two passes or more, the pass means (the evaluation's randomness, on the same test split, as
`bpd_summary`); with one pass, the batches (which also counts which images the split holds as random).
"""

import json
import logging
import math
import os
import re

import numpy as np

import checkpoints
import likelihood
import utils


class CompareError(ValueError):
  """Two evaluation folders that cannot be compared: a folder or file is missing, or the batches do not pair."""


_RESULT_FILE = re.compile(r'^(?:ckpt_(\d+)_(?:loss|fp_residual)|report_(\d+)|[a-z]+_ckpt_(\d+)_bpd_\d+)\.npz$')


def evaluated_ckpts(eval_dir):
  """The checkpoints that have at least one result file in `eval_dir`, sorted."""
  found = set()
  for name in os.listdir(eval_dir):
    match = _RESULT_FILE.match(name)
    if match:
      found.add(int(next(g for g in match.groups() if g is not None)))
  return sorted(found)


def choose_ckpt(eval_dir, ckpt, flag):
  """`ckpt` if given (it must have results in `eval_dir`), else the last evaluated checkpoint there."""
  if not os.path.isdir(eval_dir):
    raise CompareError(f'The evaluation folder {eval_dir!r} does not exist: run --mode eval on its workdir first '
                       '(or set --eval_folder).')
  ckpts = evaluated_ckpts(eval_dir)
  if not ckpts:
    raise CompareError(f'{eval_dir!r} holds no evaluation results (ckpt_K_loss.npz, *_ckpt_K_bpd_*.npz, '
                       'ckpt_K_fp_residual.npz, report_K.npz).')
  if ckpt is None:
    return ckpts[-1]
  if ckpt not in ckpts:
    raise CompareError(f'--{flag}={ckpt}: {eval_dir!r} has no results for checkpoint {ckpt}; it has {ckpts}.')
  return ckpt


def _optional(path):
  return utils.read_npz(path) if os.path.exists(path) else None


def bpd_rounds(eval_dir, split, ckpt):
  """The per-batch bits/dim arrays (`arr_0`) of one checkpoint, in round order (`batch + num_batches * pass`)."""
  pattern = re.compile(rf'^{re.escape(split)}_ckpt_{ckpt}_bpd_(\d+)\.npz$')
  rounds = sorted(int(m.group(1)) for m in map(pattern.match, os.listdir(eval_dir)) if m)
  if rounds != list(range(len(rounds))):
    raise CompareError(f'{eval_dir!r}: the bits/dim files of checkpoint {ckpt} are rounds {rounds}, not 0..N-1: '
                       'an evaluation stopped part-way; run it again.')
  return [np.asarray(utils.read_npz(os.path.join(eval_dir, f'{split}_ckpt_{ckpt}_bpd_{r}.npz'))['arr_0'],
                     dtype=np.float64).reshape(-1) for r in rounds]


def _interval(differences):
  """Mean, standard error and 95% Student-t interval of the mean of `differences` (NaN with one value)."""
  mean, half = utils.t_interval(differences)
  return mean, utils.standard_error(differences), (mean - half, mean + half)


def paired_bpd(rounds, baseline_rounds, num_repeats, names=('W', 'B')):
  """Bits/dim of two models evaluated on the same rounds, and their paired difference.

  Args:
    rounds: the fine-tuned model's per-batch bits/dim arrays, in round order (`bpd_rounds`).
    baseline_rounds: the baseline's, which must pair with `rounds` (same count, same batch sizes).
    num_repeats: the number of bits/dim passes (`eval.bpd_num_repeats`).
    names: the two folders' names, for the error message.

  Returns:
    A dict: `bpd`, `bpd_se` and `baseline_bpd`, `baseline_bpd_se` (`likelihood.bpd_summary`), `difference`,
    `difference_se`, `difference_ci95` (fine-tuned minus baseline) and `units` ('N passes' or 'N batches').
  """
  if len(rounds) != len(baseline_rounds):
    raise CompareError(f'The batches do not pair: {names[0]} has {len(rounds)} bits/dim batches, {names[1]} '
                       f'{len(baseline_rounds)}; evaluate both with the same config (eval.bpd_num_repeats, '
                       'eval.batch_size, the data).')
  sizes = [len(r) for r in rounds]
  if sizes != [len(r) for r in baseline_rounds]:
    raise CompareError(f'The batches do not pair: their sizes differ between {names[0]} and {names[1]}; '
                       'evaluate both with the same eval.batch_size and data.')
  if not rounds or len(rounds) % num_repeats:
    raise CompareError(f'{len(rounds)} bits/dim batches do not split into eval.bpd_num_repeats={num_repeats} '
                       'passes: compare with the config both were evaluated with.')
  values, baseline_values = np.concatenate(rounds), np.concatenate(baseline_rounds)
  bpd, bpd_se = likelihood.bpd_summary(values, num_repeats)
  baseline_bpd, baseline_bpd_se = likelihood.bpd_summary(baseline_values, num_repeats)
  per_value = values - baseline_values
  if num_repeats >= 2:
    units = per_value.reshape(num_repeats, -1).mean(axis=1)
    label = f'{num_repeats} passes'
  else:
    # Batch means weighted as bpd_summary weights values: by batch size (all equal but a last partial batch).
    bounds = np.cumsum([0] + sizes)
    units = np.array([per_value[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    label = f'{len(units)} batches'
  _, se, ci = _interval(units)
  return dict(bpd=bpd, bpd_se=bpd_se, baseline_bpd=baseline_bpd, baseline_bpd_se=baseline_bpd_se,
              difference=float(per_value.mean()), difference_se=se, difference_ci95=list(ci), units=label)


def _curve_summary(curves, baseline_curves, eval_dirs):
  """Means over t of the residual and the conservativity of both models (None where a file lacks them)."""
  if curves is None or baseline_curves is None:
    return {}
  if not np.allclose(curves['t'], baseline_curves['t']):
    raise CompareError(f'The FP residual files of {eval_dirs[0]!r} and {eval_dirs[1]!r} are on different t grids '
                       '(eval.fp_residual_num_times): evaluate both with the same config.')
  return {name: [float(np.mean(curves[name])), float(np.mean(baseline_curves[name]))]
          for name in ('residual', 'conservativity') if name in curves and name in baseline_curves}


def _scalar_metrics(report, baseline_report):
  """The scalar metrics (FID, IS, KID, or the TOY / DIGITS ones) present in both reports."""
  if report is None or baseline_report is None:
    return {}
  return {name: [float(np.asarray(report[name]).reshape(-1)[0]), float(np.asarray(baseline_report[name])
                                                                         .reshape(-1)[0])]
          for name in sorted(set(report) & set(baseline_report)) if np.asarray(report[name]).size == 1}


def compare_eval_dirs(eval_dir, baseline_eval_dir, ckpt, baseline_ckpt, split, num_repeats):
  """The numbers of the comparison of checkpoint `ckpt` in `eval_dir` with `baseline_ckpt` in `baseline_eval_dir`.

  Returns:
    A dict: the checkpoints and folders, `bpd` (`paired_bpd`, or None without bits/dim files in either), `loss`
    ([fine-tuned, baseline] `mean_loss`, or None), `curves` (`_curve_summary`), `metrics` (`_scalar_metrics`).

  Raises:
    CompareError: the two folders have different kinds of results, or results that do not pair.
  """
  dirs = (eval_dir, baseline_eval_dir)
  rounds, baseline_rounds = bpd_rounds(eval_dir, split, ckpt), bpd_rounds(baseline_eval_dir, split, baseline_ckpt)
  if bool(rounds) != bool(baseline_rounds):
    missing = dirs[0] if not rounds else dirs[1]
    raise CompareError(f'Only one folder has bits/dim files ({split}_ckpt_K_bpd_*.npz): {missing!r} has none for '
                       'its checkpoint; evaluate both with eval.enable_bpd=True.')
  result = dict(ckpt=ckpt, baseline_ckpt=baseline_ckpt, eval_dir=eval_dir, baseline_eval_dir=baseline_eval_dir,
                split=split, bpd=None, loss=None)
  if rounds:
    result['bpd'] = paired_bpd(rounds, baseline_rounds, num_repeats, names=dirs)
  losses = [_optional(os.path.join(d, f'ckpt_{k}_loss.npz')) for d, k in zip(dirs, (ckpt, baseline_ckpt))]
  if all(loss is not None for loss in losses):
    result['loss'] = [float(loss['mean_loss']) for loss in losses]
  curves = [_optional(os.path.join(d, f'ckpt_{k}_fp_residual.npz')) for d, k in zip(dirs, (ckpt, baseline_ckpt))]
  result['curves'] = _curve_summary(*curves, dirs)
  result['curve_arrays'] = curves
  reports = [_optional(os.path.join(d, f'report_{k}.npz')) for d, k in zip(dirs, (ckpt, baseline_ckpt))]
  result['metrics'] = _scalar_metrics(*reports)
  return result


def _number(x, digits=6):
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def format_table(result):
  """The comparison as a fixed-width text table: one row per quantity, fine-tuned | baseline | difference."""
  head = (f'fine-tuned {result["eval_dir"]} ckpt {result["ckpt"]} vs baseline {result["baseline_eval_dir"]} '
          f'ckpt {result["baseline_ckpt"]}')
  rows = [('quantity', 'fine-tuned', 'baseline', 'fine-tuned - baseline')]
  b = result['bpd']
  if b is not None:
    lo, hi = b['difference_ci95']
    rows.append((f'{result["split"]} bits/dim (+- se)', f'{_number(b["bpd"])} +- {_number(b["bpd_se"])}',
                 f'{_number(b["baseline_bpd"])} +- {_number(b["baseline_bpd_se"])}',
                 f'{_number(b["difference"])}, 95% [{_number(lo)}, {_number(hi)}] (paired, {b["units"]})'))
  if result['loss'] is not None:
    rows.append(('eval loss', _number(result['loss'][0]), _number(result['loss'][1]),
                 _number(result['loss'][0] - result['loss'][1])))
  for name, (w, base) in result['curves'].items():
    rows.append((f'{name} (mean over t)', _number(w), _number(base), _number(w - base)))
  for name, (w, base) in result['metrics'].items():
    rows.append((name, _number(w, 4), _number(base, 4), _number(w - base, 4)))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  lines = [head] + ['  '.join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + '  ' + row[3] for row in rows]
  return '\n'.join(line.rstrip() for line in lines) + '\n'


def plot_curves(result, path):
  """A PNG of the residual and the conservativity against t, fine-tuned and baseline (panels present in both)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  curves, baseline_curves = result['curve_arrays']
  names = list(result['curves'])
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    ax.plot(curves['t'], curves[name], label=f'fine-tuned (ckpt {result["ckpt"]})')
    ax.plot(baseline_curves['t'], baseline_curves[name], '--', label=f'baseline (ckpt {result["baseline_ckpt"]})')
    ax.set_xlabel('t')
    ax.set_ylabel(name)
    ax.set_xscale('log')
    ax.legend()
  fig.tight_layout()
  with checkpoints.atomic_write(path) as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


def write_comparison(result, eval_dir):
  """Writes the table, its numbers (JSON) and, where there are curves, the plot into `eval_dir`; returns the
  table."""
  stem = os.path.join(eval_dir, f'compare_{result["ckpt"]}_vs_{result["baseline_ckpt"]}')
  table = format_table(result)
  with checkpoints.atomic_write(stem + '.txt') as f:
    f.write(table.encode())
  numbers = {k: v for k, v in result.items() if k != 'curve_arrays'}
  with checkpoints.atomic_write(stem + '.json') as f:
    f.write(json.dumps(numbers, indent=1).encode())
  if result['curves']:
    plot_curves(result, stem + '.png')
  logging.info('Wrote %s.txt, .json%s.', stem, ', .png' if result['curves'] else '')
  return table


def compare_workdirs(config, workdir, baseline_workdir, eval_folder='eval', ckpt=None, baseline_ckpt=None):
  """`main.py --mode compare`: checkpoint `ckpt` of `workdir/eval_folder` against `baseline_ckpt` of
  `baseline_workdir/eval_folder` (each by default the last one evaluated there), written into the former.

  `config` is the config both were evaluated with: its `eval.bpd_dataset` and `eval.bpd_num_repeats` name and
  split the bits/dim files.

  Returns:
    The table (text).

  Raises:
    CompareError: a folder or file is missing, or the two evaluations do not pair.
  """
  for flag, folder in (('--workdir', workdir), ('--baseline_workdir', baseline_workdir)):
    if not os.path.isdir(folder):
      raise CompareError(f'{flag}={folder}: the folder does not exist.')
  eval_dir, baseline_eval_dir = os.path.join(workdir, eval_folder), os.path.join(baseline_workdir, eval_folder)
  ckpt = choose_ckpt(eval_dir, ckpt, 'ckpt')
  baseline_ckpt = choose_ckpt(baseline_eval_dir, baseline_ckpt, 'baseline_ckpt')
  result = compare_eval_dirs(eval_dir, baseline_eval_dir, ckpt, baseline_ckpt, config.eval.bpd_dataset,
                             config.eval.bpd_num_repeats)
  return write_comparison(result, eval_dir)
