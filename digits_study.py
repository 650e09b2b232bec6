"""The DIGITS study (docs/study.md): is the VP likelihood gain of DSM + FP fine-tuning the FP term's? On CPU.

    python digits_study.py --workdir W [--sde vp ve] [--seeds 0 1 2] [--jobs 2] [--collect]

The grid (`GRID`) crosses *settings* (an SDE, a pretraining seed, exact 17-level data or
`data.uniform_dequantization`) with fine-tuning *arms* (`ARMS`: the pretrained model itself, DSM or DSM + FP,
likelihood weighting or Score SDE's, the FP weights balanced for either weighting, a DSM run with the compute of
an FP run, lazy FP steps). Per setting:
  1. pretrain with DSM (`main.py --mode train`, configs/digits/<sde>_..._continuous.py with the setting's
     overrides);
  2. choose alpha and beta on training data only (`balanced_weights`), once per loss weighting: at the
     pretrained weights, on `ALPHA_BATCHES` training batches, the FP terms together equal the DSM term of the
     fine-tuning loss, split evenly between the vector and the scalar term;
  3. per arm and seed: fine-tune the pretrained checkpoint (configs/digits/fp_<sde>_..._continuous.py with the
     arm's overrides; the arm `pretrained` fine-tunes nothing) and evaluate the result with the same seed:
     test bits/dim for 17 levels over `BPD_REPEATS` passes (mean and standard error), sample metrics
     (`datasets.DigitsData`), the score-FPE residual vs t and the conservativity vs t. The seed fixes the
     fine-tuning's data order and loss noise and the evaluation's dequantization noise and probes, so arms are
     compared paired by seed.
Every command is a `main.py` command line run under `nice` with one thread (OMP_NUM_THREADS=1); its wall time is
read from its log. A rerun keeps what is done (a pretraining, the weights, a fine-tuned checkpoint, an
evaluation) and runs the rest, most decisive cells first (`GRID`'s order); `--collect` only writes the outputs.
Results go to `W/digits_study.json` and the same as tables in `W/digits_study.md`: every run's settings and
results (`run_record`), per (setting, arm) the mean and 95% interval over seeds, and the paired differences of
`COMPARISONS` with their 95% intervals and cost ratios.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import glob
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

import checkpoints
import datasets
import distributed
import likelihood
import losses
from models import utils as mutils
import preemption
import run_lib
import sde_lib
import utils

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {'ve': 'configs/digits/ve_ncsnpp_continuous.py', 'vp': 'configs/digits/vp_ddpmpp_continuous.py'}
FINE_TUNING_CONFIGS = {'ve': 'configs/digits/fp_ve_ncsnpp_continuous.py',
                       'vp': 'configs/digits/fp_vp_ddpmpp_continuous.py'}
# The configs' `seed` (Score SDE's 42): the pretraining seed of a setting that does not override it.
CONFIG_SEED = 42
PRETRAINING_STEPS = 4000  # configs/digits/default_digits_configs.PRETRAINING_STEPS (checked by a test)
FINE_TUNING_STEPS = 200  # configs/digits/fp_finetuning.FINE_TUNING_STEPS (checked by a test)
# Training batches the FP weights are balanced on (batch 64 each).
ALPHA_BATCHES = 4
# Evaluation batches of 120 test images (3 bits/dim batches over the 360; one sampling round of 120): the ODE
# solve of bits/dim (Score SDE's tolerances) dominates the study's time on CPU.
EVAL_OVERRIDES = {'eval.batch_size': 120, 'eval.num_samples': 120}
# Bits/dim passes per evaluation: two give every run a standard error of its own (one gives none,
# `likelihood.bpd_summary`) and halve the variance of the dequantization and probe noise; the seeds cover the
# fine-tuning's variance, which the paired comparisons need more.
BPD_REPEATS = 2
# Metrics summarized per (setting, arm) and differenced per comparison.
METRICS = ('nll_bpd', 'fp_residual_mean', 'fp_residual_weighted_mean', 'conservativity', 'mmd', 'digit_score')


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a pretraining is: the SDE, its seed, and whether training images are dequantized."""
  sde: str
  pretrain_seed: int = CONFIG_SEED
  uniform_dequantization: bool = False

  @property
  def name(self):
    return f'{"dequantized" if self.uniform_dequantization else "levels"}_p{self.pretrain_seed}'

  @property
  def description(self):
    data = 'dequantized training data' if self.uniform_dequantization else 'exact 17 levels'
    return f'{self.sde.upper()}, pretraining seed {self.pretrain_seed}, {data}'

  def data_overrides(self):
    """The overrides every command of this setting carries (pretraining, fine-tuning, evaluation)."""
    return {'data.uniform_dequantization': True} if self.uniform_dequantization else {}

  def pretraining_overrides(self):
    overrides = self.data_overrides()
    if self.pretrain_seed != CONFIG_SEED:
      overrides['seed'] = self.pretrain_seed
    return overrides


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way of fine-tuning the pretrained checkpoint (or, `pretrained`, none)."""
  name: str
  description: str
  fp: bool = False  # the FP terms on (alpha, beta balanced for `weights_for`), else alpha = beta = 0
  likelihood_weighting: bool = True  # the paper's fine-tuning weighting; False: Score SDE's (the pretraining's)
  weights_for: str = 'likelihood'  # which weighting's balanced alpha, beta an FP arm uses
  steps: int = FINE_TUNING_STEPS
  fp_every: int = 1
  pretrained: bool = False


# DSM steps with about the fine-tuning compute of one FP run's 200 steps: an FP step cost 3.5-3.7x a DSM step
# on the digits (128-137 s against 36-39 s per 200 steps, docs/study.md); every run records its real cost.
MATCHED_DSM_STEPS = 4 * FINE_TUNING_STEPS
ARMS = {arm.name: arm for arm in (
    Arm('pretrained', 'the pretrained model (no fine-tuning), evaluated with each seed', pretrained=True,
        likelihood_weighting=False),
    Arm('dsm', 'DSM, likelihood weighting (the paper\'s fine-tuning without the FP terms)'),
    Arm('fp', 'DSM + FP, likelihood weighting (the paper\'s fine-tuning)', fp=True),
    Arm('dsm_sw', 'DSM, Score SDE weighting (the pretraining\'s loss)', likelihood_weighting=False),
    Arm('fp_sw', 'DSM + FP, Score SDE weighting, the alpha and beta of `fp`', fp=True,
        likelihood_weighting=False),
    Arm('fp_sw_bal', 'DSM + FP, Score SDE weighting, alpha and beta balanced for it', fp=True,
        likelihood_weighting=False, weights_for='score_sde'),
    Arm('dsm_4x', f'DSM, likelihood weighting, {MATCHED_DSM_STEPS} steps (the compute of `fp`)',
        steps=MATCHED_DSM_STEPS),
    Arm('fp_every4', 'DSM + FP, likelihood weighting, FP terms on every 4th step at 4x weight', fp=True,
        fp_every=4),
)}
# The grid, most decisive cells first (a rerun or a cut-short run fills it in this order). VP carries the gain
# to explain. VE's likelihood weighting is Score SDE's times a constant, so its weighting cells would repeat
# `dsm` and `fp`; the cell that could change its null result (DSM + FP = DSM on exact levels, docs/study.md) is
# dequantized data, with the pretrained model paired by seed. VE on exact levels repeats the first run's cell
# with the current code and the paired pretrained baseline (last: it was run after the 2-hour grid).
GRID = (
    (Setting('vp'), ('pretrained', 'dsm', 'fp', 'dsm_sw', 'fp_sw', 'fp_sw_bal')),
    (Setting('vp', uniform_dequantization=True), ('pretrained', 'dsm', 'fp', 'dsm_sw', 'fp_sw_bal')),
    (Setting('vp', pretrain_seed=43), ('pretrained', 'dsm', 'fp', 'dsm_sw')),
    (Setting('vp'), ('dsm_4x', 'fp_every4')),
    (Setting('ve', uniform_dequantization=True), ('pretrained', 'dsm', 'fp')),
    (Setting('ve'), ('pretrained', 'dsm', 'fp')),
)
# Paired comparisons (first arm minus second, seed by seed within a setting) and the question each answers.
COMPARISONS = (
    ('fp', 'dsm', 'FP terms, likelihood weighting (the paper\'s comparison)'),
    ('fp', 'dsm_sw', 'the paper\'s fine-tuning against the best-known DSM control'),
    ('fp_sw', 'dsm_sw', 'FP terms under Score SDE weighting, same alpha, beta'),
    ('fp_sw_bal', 'dsm_sw', 'FP terms under Score SDE weighting, balanced alpha, beta'),
    ('fp', 'fp_sw', 'likelihood weighting under DSM + FP'),
    ('dsm', 'dsm_sw', 'likelihood weighting under DSM'),
    ('fp', 'pretrained', 'fine-tuning with FP against no fine-tuning'),
    ('dsm', 'pretrained', 'fine-tuning with DSM against no fine-tuning'),
    ('dsm_sw', 'pretrained', 'fine-tuning with the pretraining\'s loss against none'),
    ('fp', 'dsm_4x', 'FP against DSM with the same compute'),
    ('fp_every4', 'fp', 'lazy FP steps against every-step FP'),
)


def grid(sdes):
  """The (setting, arm) cells of `GRID` for the SDEs `sdes`, in `GRID`'s order."""
  return [(setting, ARMS[name]) for setting, names in GRID if setting.sde in sdes for name in names]


def settings_of(cells):
  return list(dict.fromkeys(setting for setting, _ in cells))


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


def eval_overrides():
  """What every evaluation adds to its run's overrides."""
  # 8 Rademacher probes per sample for the conservativity (the exact Jacobian takes 64 backward passes per
  # batch and t).
  return dict(EVAL_OVERRIDES, **{'eval.enable_conservativity': True, 'eval.conservativity_num_probes': 8,
                                 'eval.bpd_num_repeats': BPD_REPEATS})


def load_config(path, overrides):
  """The config of the file `path` (relative to the repository) with `overrides` ({'a.b': value}) applied, as
  `main.py --config.a.b=value` would apply them."""
  spec = importlib.util.spec_from_file_location('digits_study_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def read_results(workdir, ckpt):
  """The numbers `main.py --mode eval` wrote for checkpoint `ckpt` in `workdir/eval`."""
  eval_dir = os.path.join(workdir, 'eval')
  bpd_files = sorted(glob.glob(os.path.join(eval_dir, f'test_ckpt_{ckpt}_bpd_*.npz')),
                     key=lambda p: int(p.rsplit('_', 1)[1][:-4]))
  bpds = utils.read_npz(bpd_files[-1])['all_bpds']
  mean, stderr = likelihood.bpd_summary(bpds, BPD_REPEATS)
  residual = utils.read_npz(os.path.join(eval_dir, f'ckpt_{ckpt}_fp_residual.npz'))
  # The plain residual's mean over t is dominated by the smallest t; the lambda(t)-weighted one (what the loss
  # penalizes) is reported beside it.
  out = {'nll_bpd': mean, 'nll_bpd_stderr': stderr, 'fp_residual_mean': float(np.mean(residual['residual'])),
         'fp_residual_weighted_mean': float(np.mean(residual['residual_weighted'])),
         'fp_residual_vs_t': {'t': residual['t'].tolist(), 'residual': residual['residual'].tolist(),
                              'residual_weighted': residual['residual_weighted'].tolist()}}
  report = utils.read_npz(os.path.join(eval_dir, f'report_{ckpt}.npz'))
  out.update({name: float(value) for name, value in report.items()})
  out['conservativity'] = float(np.mean(residual['conservativity']))
  out['conservativity_vs_t'] = residual['conservativity'].tolist()
  return out


def balanced_weights(fine_tuning_config, checkpoint, overrides=None):
  """alpha, beta such that, at the pretrained weights and on training data, alpha R_vec = beta R_sc = DSM / 2.

  Measured with the fine-tuning loss as `overrides` set it (its weighting, dequantization; FP terms on
  `training.fp_batch_fraction` of each batch, the training reductions) on `ALPHA_BATCHES` training batches of
  seed 0; only training images are read.
  """
  torch.set_num_threads(1)
  config = load_config(fine_tuning_config, dict(overrides or {}, **{'seed': 0, 'training.alpha': 1.,
                                                                     'training.beta': 1.}))
  config.device = torch.device('cpu')
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


@functools.lru_cache(maxsize=None)
def forward_passes_per_step(fine_tuning_config, overrides):
  """Samples through the network in one fine-tuning step: `(dsm_step, fp_step)`, counted by a forward hook on
  the network in one call of the training loss on a training batch (a DSM-only step and a step with the FP
  terms; a `torch.func.jvp` through the network counts as one pass). `overrides`: a tuple of (key, value)."""
  counts = {}
  for name, weight in (('dsm', 0.), ('fp', 1.)):
    config = load_config(fine_tuning_config, dict(overrides, **{'training.alpha': weight, 'training.beta': weight}))
    config.device = torch.device('cpu')
    model = mutils.create_model(config)
    loss = losses.loss_from_config(config, sde_lib.sde_from_config(config))
    batch = next(datasets.get_data(config).train_batches(0, distributed.context()))
    seen = []
    hook = model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    try:
      loss.reduce(loss(model, batch, train=True), batch.shape[0])
    finally:
      hook.remove()
    counts[name] = int(sum(seen))
  return counts['dsm'], counts['fp']


def network_evals(record):
  """Forward passes of the network (samples through it) during a run's fine-tuning: DSM-only steps and FP
  steps (with `fp_every` = k, the steps whose global step is a multiple of k) at their counted cost."""
  if record['fine_tuning_steps'] == 0:
    return 0
  overrides = {'data.uniform_dequantization': record['uniform_dequantization'],
               'training.likelihood_weighting': record['likelihood_weighting']}
  dsm_step, fp_step = forward_passes_per_step(FINE_TUNING_CONFIGS[record['sde']], tuple(sorted(overrides.items())))
  steps = range(PRETRAINING_STEPS, PRETRAINING_STEPS + record['fine_tuning_steps'])
  fp_steps = sum(1 for step in steps if step % record['fp_every'] == 0) if record['alpha'] or record['beta'] else 0
  return fp_steps * fp_step + (len(steps) - fp_steps) * dsm_step


def setting_dir(workdir, setting):
  return os.path.join(workdir, setting.sde, setting.name)


def run_dir(workdir, setting, arm, seed):
  return os.path.join(setting_dir(workdir, setting), f'{arm.name}_seed{seed}')


def pretrained_checkpoint(workdir, setting):
  """The pretraining's state at its last step (its one checkpoint)."""
  return os.path.join(setting_dir(workdir, setting), 'pretrain', 'checkpoints', 'checkpoint_1.pth')


def weights_path(workdir, setting, weighting):
  return os.path.join(setting_dir(workdir, setting), f'fp_weights_{weighting}.json')


def load_weights(workdir, setting, weighting):
  with open(weights_path(workdir, setting, weighting)) as f:
    return json.load(f)


def final_checkpoint(arm):
  """The number of the checkpoint an arm evaluates: the pretraining's one, or fine-tuning's last save
  (checkpoint_{n_iters // snapshot_freq}, snapshot_freq being the arm's number of steps)."""
  return 1 if arm.pretrained else (PRETRAINING_STEPS + arm.steps) // arm.steps


def arm_overrides(setting, arm, seed, weights):
  """The `--config.*` overrides of one cell's training (fine-tuning) command; `weights`: weighting -> the
  balanced {'alpha', 'beta'} (only an FP arm reads it)."""
  overrides = dict(setting.data_overrides(), seed=seed)
  if arm.pretrained:
    return overrides
  chosen = weights[arm.weights_for] if arm.fp else {'alpha': 0., 'beta': 0.}
  overrides.update({'training.alpha': chosen['alpha'], 'training.beta': chosen['beta']})
  if not arm.likelihood_weighting:
    overrides['training.likelihood_weighting'] = False
  if arm.steps != FINE_TUNING_STEPS:
    # One checkpoint at the end: the evaluation range of configs/fp/fp_finetuning follows both fields.
    overrides.update({'training.n_iters': PRETRAINING_STEPS + arm.steps, 'training.snapshot_freq': arm.steps})
  if arm.fp_every != 1:
    overrides['training.fp_every'] = arm.fp_every
  return overrides


def cell_commands(workdir, setting, arm, seed, weights):
  """(training args or None, evaluation args, training overrides) of one cell."""
  overrides = arm_overrides(setting, arm, seed, weights)
  directory = run_dir(workdir, setting, arm, seed)
  config = CONFIGS[setting.sde] if arm.pretrained else FINE_TUNING_CONFIGS[setting.sde]
  train_args = None if arm.pretrained else main_args(config, directory, 'train', overrides)
  return train_args, main_args(config, directory, 'eval', dict(overrides, **eval_overrides())), overrides


def is_evaluated(workdir, setting, arm, seed):
  # The residual file is the last one an evaluation writes.
  return os.path.exists(os.path.join(run_dir(workdir, setting, arm, seed), 'eval',
                                     f'ckpt_{final_checkpoint(arm)}_fp_residual.npz'))


def pretrain(workdir, setting):
  """Pretrains a setting (kept if done; an interrupted one resumes from its preemption checkpoint)."""
  directory = os.path.join(setting_dir(workdir, setting), 'pretrain')
  os.makedirs(directory, exist_ok=True)
  _wait_for_trainer(directory)
  if not os.path.exists(pretrained_checkpoint(workdir, setting)):
    run_command(main_args(CONFIGS[setting.sde], directory, 'train', setting.pretraining_overrides()),
                os.path.join(setting_dir(workdir, setting), 'pretrain_train.log'))


def choose_weights(workdir, setting):
  """Balances alpha, beta for each loss weighting (kept if done)."""
  for weighting, likelihood_weighting in (('likelihood', True), ('score_sde', False)):
    path = weights_path(workdir, setting, weighting)
    if os.path.exists(path):
      continue
    start = time.time()
    overrides = dict(setting.data_overrides(), **{'training.likelihood_weighting': likelihood_weighting})
    weights = balanced_weights(FINE_TUNING_CONFIGS[setting.sde], pretrained_checkpoint(workdir, setting), overrides)
    weights['seconds'] = time.time() - start
    with open(path, 'w') as f:
      json.dump(weights, f, indent=1)


def run_cell(workdir, setting, arm, seed):
  """Fine-tunes (unless `arm` is `pretrained`) and evaluates one cell; a fine-tuned checkpoint is kept, an
  interrupted fine-tuning resumes from its own preemption checkpoint."""
  weights = {w: load_weights(workdir, setting, w) for w in ('likelihood', 'score_sde')}
  directory = run_dir(workdir, setting, arm, seed)
  train_args, eval_args, _ = cell_commands(workdir, setting, arm, seed, weights)
  ckpt = os.path.join(directory, 'checkpoints', f'checkpoint_{final_checkpoint(arm)}.pth')
  if arm.pretrained:
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    shutil.copyfile(pretrained_checkpoint(workdir, setting), ckpt)
  elif not os.path.exists(ckpt):
    meta = os.path.join(directory, 'checkpoints-meta', 'checkpoint.pth')
    if not os.path.exists(meta):
      os.makedirs(os.path.dirname(meta), exist_ok=True)
      shutil.copyfile(pretrained_checkpoint(workdir, setting), meta)
    run_command(train_args, os.path.join(directory, 'train.log'))
  run_command(eval_args, os.path.join(directory, 'eval.log'))


def run_grid(workdir, cells, seeds, jobs):
  """Pretrains the settings, balances their weights, then runs every cell not evaluated yet, `jobs` at a
  time; returns the failures' messages (a failed task does not stop the others)."""
  settings = settings_of(cells)
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    failures = [error for error, ok in pool.map(
        _failures_logged, [functools.partial(pretrain, workdir, s) for s in settings]) if ok is None]
  ready = [s for s in settings if os.path.exists(pretrained_checkpoint(workdir, s))]
  for setting in ready:
    choose_weights(workdir, setting)
  tasks = [functools.partial(run_cell, workdir, setting, arm, seed)
           for setting, arm in cells if setting in ready for seed in seeds
           if not is_evaluated(workdir, setting, arm, seed)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    failures += [error for error, ok in pool.map(_failures_logged, tasks) if ok is None]
  return failures


def _failures_logged(task):
  """Runs a task; a failed one returns (its error message, None) instead of stopping the other runs."""
  try:
    return task(), True
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('A study task failed.')
    return str(e), None


def run_record(setting, arm, seed, overrides, results, seconds):
  """One run's settings, cost and results, as the JSON holds it."""
  record = {'sde': setting.sde, 'setting': setting.name, 'arm': arm.name, 'seed': seed,
            'pretrain_seed': setting.pretrain_seed, 'uniform_dequantization': setting.uniform_dequantization,
            'likelihood_weighting': arm.likelihood_weighting, 'alpha': overrides.get('training.alpha', 0.),
            'beta': overrides.get('training.beta', 0.), 'fp_every': arm.fp_every,
            'fine_tuning_steps': 0 if arm.pretrained else arm.steps, 'train_seconds': seconds.get('fine-tuning', 0.),
            'eval_seconds': seconds['evaluation']}
  record['network_evals'] = network_evals(record)
  record.update(results)
  return record


def collect(workdir, cells, seeds, record):
  """Reads what the commands of `cells` wrote (results, and durations from their logs) into `record`."""
  for setting in settings_of(cells):
    base = setting_dir(workdir, setting)
    log = os.path.join(base, 'pretrain_train.log')
    if not os.path.exists(pretrained_checkpoint(workdir, setting)) or not os.path.exists(log):
      logging.warning('%s: not pretrained; left out.', base)
      continue
    pretrain_args = main_args(CONFIGS[setting.sde], os.path.join(base, 'pretrain'), 'train',
                              setting.pretraining_overrides())
    record['commands'].append({'what': f'{setting.sde} {setting.name} DSM pretraining',
                               'command': _printable(pretrain_args), 'seconds': _logged_seconds(log)})
    weights = {}
    for weighting in ('likelihood', 'score_sde'):
      if os.path.exists(weights_path(workdir, setting, weighting)):
        weights[weighting] = load_weights(workdir, setting, weighting)
        record['commands'].append({'what': f'{setting.sde} {setting.name} FP weights for {weighting} weighting',
                                   'command': 'python -c "import digits_study; digits_study.balanced_weights(...)"',
                                   'seconds': weights[weighting]['seconds']})
    record['settings'].append(dict(dataclasses.asdict(setting), name=setting.name,
                                   description=setting.description, weights=weights))
  for setting, arm in cells:
    for seed in seeds:
      directory = run_dir(workdir, setting, arm, seed)
      if not is_evaluated(workdir, setting, arm, seed):
        logging.warning('%s: not evaluated; left out.', directory)
        continue
      weights = {w: load_weights(workdir, setting, w) for w in ('likelihood', 'score_sde')}
      train_args, eval_args, overrides = cell_commands(workdir, setting, arm, seed, weights)
      seconds = {}
      for what, args, log in (('fine-tuning', train_args, 'train.log'), ('evaluation', eval_args, 'eval.log')):
        if args is not None:
          seconds[what] = _logged_seconds(os.path.join(directory, log))
          record['commands'].append({'what': f'{setting.sde} {setting.name} {arm.name} seed {seed} {what}',
                                     'command': _printable(args), 'seconds': seconds[what]})
      results = read_results(directory, final_checkpoint(arm))
      record['runs'].append(run_record(setting, arm, seed, overrides, results, seconds))


def summarize(runs):
  """Mean and 95% interval (Student's t over seeds, `utils.t_interval`) per (sde, setting, arm) and metric,
  with the mean per-run standard error of bits/dim and the mean cost."""
  groups = {}
  for run in runs:
    groups.setdefault((run['sde'], run['setting'], run['arm']), []).append(run)
  summary = []
  for (sde, setting, arm), members in groups.items():
    row = {'sde': sde, 'setting': setting, 'arm': arm, 'num_seeds': len(members),
           'nll_bpd_stderr_mean': float(np.mean([m.get('nll_bpd_stderr', np.nan) for m in members])),
           'train_seconds': float(np.mean([m['train_seconds'] for m in members])),
           'network_evals': float(np.mean([m['network_evals'] for m in members]))}
    for metric in METRICS:
      values = np.array([m[metric] for m in members if m.get(metric) is not None], dtype=np.float64)
      if values.size:
        mean, half = utils.t_interval(values)
        row[metric] = {'mean': mean, 'ci95': half}
    summary.append(row)
  return summary


def _comparison_groups(runs):
  """label -> the (sde, setting)s whose pairs a comparison pools: each setting alone, and the settings that
  differ only in the pretraining seed together."""
  groups, pools = {}, {}
  for run in runs:
    key = (run['sde'], run['setting'])
    groups.setdefault(f'{run["sde"]} {run["setting"]}', [key])
    pool = pools.setdefault((run['sde'], run['uniform_dequantization']), [])
    if key not in pool:
      pool.append(key)
  for (sde, dequantized), members in pools.items():
    if len(members) > 1:
      seeds = '+'.join(setting.rsplit('_p', 1)[1] for _, setting in members)
      groups[f'{sde} {"dequantized" if dequantized else "levels"}_p{seeds}'] = members
  return groups


def paired_differences(runs):
  """Per comparison of `COMPARISONS` and setting (and pooled over pretraining seeds): first arm minus second,
  seed by seed (same data order, loss noise, dequantization and probes), with the mean and 95% interval over
  the pairs both arms finished, and each arm's mean cost."""
  by_key = {(r['sde'], r['setting'], r['arm'], r['seed']): r for r in runs}
  seeds = sorted({r['seed'] for r in runs})
  rows = []
  for label, members in _comparison_groups(runs).items():
    for first, second, question in COMPARISONS:
      pairs = [(by_key[(sde, s, first, seed)], by_key[(sde, s, second, seed)]) for sde, s in members for seed in seeds
               if (sde, s, first, seed) in by_key and (sde, s, second, seed) in by_key]
      if not pairs or (len(members) > 1 and len({a['setting'] for a, _ in pairs}) < 2):
        continue  # a pooled row only where both pretrainings ran the pair (else it repeats a setting's row)
      row = {'group': label, 'first': first, 'second': second, 'question': question,
             'pairs': [[a['setting'], a['seed']] for a, _ in pairs], 'metrics': {},
             'cost': {key: [float(np.mean([p[i][key] for p in pairs])) for i in (0, 1)]
                      for key in ('train_seconds', 'network_evals')}}
      for metric in ('nll_bpd', 'conservativity', 'fp_residual_mean', 'digit_score', 'mmd'):
        values = [a[metric] - b[metric] for a, b in pairs if a.get(metric) is not None and b.get(metric) is not None]
        if values:
          mean, half = utils.t_interval(values)
          row['metrics'][metric] = {'per_pair': values, 'mean': mean, 'ci95': half}
      rows.append(row)
  return rows


def _number(value, digits):
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return '-'
  return f'{value:.{digits}f}' if value == 0 or abs(value) >= 10 ** -digits else f'{value:.2e}'


def _interval(entry, digits, signed=False):
  if entry is None:
    return '-'
  sign = '+' if signed else ''
  return f'{entry["mean"]:{sign}.{digits}f} ± {entry["ci95"]:.{digits}f}'


def _ratio(pair):
  return f'{_number(pair[0], 0)} / {_number(pair[1], 0)}'


def format_report(record):
  """The study as markdown: the arms, the settings and their FP weights, the paired comparisons (the control
  cells) with their cost, per (setting, arm) means, every run, curves vs t, and the commands with durations."""
  lines = [f'# DIGITS study ({record["written"]})', '', f'Seeds {record["seeds"]}; bits/dim for 17 levels on the '
           f'360 test images, {BPD_REPEATS} passes per evaluation. Arms:', '', '| arm | what |', '| --- | --- |']
  used = list(dict.fromkeys(r['arm'] for r in record['runs']))
  lines += [f'| {name} | {ARMS[name].description} |' for name in used if name in ARMS]
  lines += ['', '## Settings and FP weights (balanced on training data at the pretrained weights)', '',
            '| setting | what | alpha, beta (likelihood weighting) | alpha, beta (Score SDE weighting) |',
            '| --- | --- | --- | --- |']
  for s in record['settings']:
    cells = [f'{s["weights"][w]["alpha"]:.4g}, {s["weights"][w]["beta"]:.4g}' if w in s['weights'] else '-'
             for w in ('likelihood', 'score_sde')]
    lines.append(f'| {s["sde"]} {s["name"]} | {s["description"]} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Paired comparisons (first arm minus second, by seed: mean ± 95% interval)', '',
            '| setting | comparison | question | pairs | Δ bits/dim | per pair | Δ conservativity | Δ digit score '
            '| fine-tuning s (first / second) | network evals (first / second) |', '| --- ' * 10 + '|']
  for row in record['paired']:
    m = row['metrics']
    per_pair = ', '.join(f'{v:+.3f}' for v in m['nll_bpd']['per_pair']) if 'nll_bpd' in m else '-'
    lines.append(f'| {row["group"]} | {row["first"]} − {row["second"]} | {row["question"]} | {len(row["pairs"])} | '
                 f'{_interval(m.get("nll_bpd"), 4, True)} | {per_pair} | {_interval(m.get("conservativity"), 4, True)} '
                 f'| {_interval(m.get("digit_score"), 2, True)} | {_ratio(row["cost"]["train_seconds"])} | '
                 f'{_ratio(row["cost"]["network_evals"])} |')
  metrics = (('nll_bpd', 'bits/dim', 4), ('fp_residual_mean', 'residual', 1),
             ('fp_residual_weighted_mean', 'weighted residual', 2), ('conservativity', 'conservativity', 4),
             ('mmd', 'mmd', 4), ('digit_score', 'digit score', 2))
  lines += ['', '## Per arm (mean ± 95% interval over seeds)', '',
            '| setting | arm | seeds | ' + ' | '.join(m[1] for m in metrics) +
            ' | bits/dim stderr of a run | fine-tuning s | network evals |', '| --- ' * (len(metrics) + 6) + '|']
  for row in record['summary']:
    cells = [_interval(row.get(key), digits) for key, _, digits in metrics]
    lines.append(f'| {row["sde"]} {row["setting"]} | {row["arm"]} | {row["num_seeds"]} | ' + ' | '.join(cells) +
                 f' | {_number(row["nll_bpd_stderr_mean"], 4)} | {_number(row["train_seconds"], 0)} | '
                 f'{_number(row["network_evals"], 0)} |')
  lines += ['', '## Every run', '', '| setting | arm | seed | alpha | beta | bits/dim | ± stderr | residual | '
            'conservativity | digit score | mmd | fine-tuning s | eval s | network evals |', '| --- ' * 14 + '|']
  for r in record['runs']:
    lines.append(f'| {r["sde"]} {r["setting"]} | {r["arm"]} | {r["seed"]} | {r["alpha"]:.4g} | {r["beta"]:.4g} | '
                 f'{_number(r["nll_bpd"], 4)} | {_number(r.get("nll_bpd_stderr"), 4)} | '
                 f'{_number(r["fp_residual_mean"], 1)} | {_number(r.get("conservativity"), 4)} | '
                 f'{_number(r.get("digit_score"), 2)} | {_number(r.get("mmd"), 4)} | {_number(r["train_seconds"], 0)} '
                 f'| {_number(r["eval_seconds"], 0)} | {r["network_evals"]} |')
  for s in record['settings']:
    for curve, label in (('fp_residual_vs_t', 'Score-FPE residual'), ('conservativity_vs_t', 'Conservativity')):
      lines += _curve_table(record, s['sde'], s['name'], curve, label)
  lines += ['', '## Commands', '', '| what | command | seconds |', '| --- | --- | --- |']
  lines += [f'| {c["what"]} | `{c["command"]}` | {c["seconds"]:.0f} |' for c in record['commands']]
  return '\n'.join(lines) + '\n'


def _curve_table(record, sde, setting, curve, label):
  """A curve against t (mean over seeds per arm) of one setting as a markdown table."""
  runs = [r for r in record['runs'] if (r['sde'], r['setting']) == (sde, setting) and curve in r]
  if not runs:
    return []
  t = runs[0]['fp_residual_vs_t']['t']
  values = lambda r: r[curve]['residual'] if curve == 'fp_residual_vs_t' else r[curve]
  lines = ['', f'{label} against t, {sde} {setting} (mean over seeds):', '',
           '| arm | ' + ' | '.join(f'{x:.3g}' for x in t) + ' |', '| --- ' * (len(t) + 1) + '|']
  for arm in dict.fromkeys(r['arm'] for r in runs):
    mean = np.mean([values(r) for r in runs if r['arm'] == arm], axis=0)
    lines.append(f'| {arm} | ' + ' | '.join(f'{v:.3g}' for v in mean) + ' |')
  return lines


def real_image_metrics(num_images=120):
  """The sample metrics of `num_images` real training images (a fixed draw), as a reference for the models'."""
  config = load_config(CONFIGS['ve'], {})
  config.device = torch.device('cpu')
  images = datasets.load_digits_splits()['train'][0]
  chosen = images[np.random.default_rng(0).choice(len(images), num_images, replace=False)]
  arrays = np.clip(chosen.astype(np.float64) / 16. * 255., 0, 255).astype(np.uint8)
  return datasets.DigitsData(config).sample_quality([(arrays, None)], num_images)


def write_outputs(workdir, record):
  """Writes `W/digits_study.json` and `W/digits_study.md`, each atomically (`checkpoints.atomic_write`)."""
  record['summary'] = summarize(record['runs'])
  record['paired'] = paired_differences(record['runs'])
  with checkpoints.atomic_write(os.path.join(workdir, 'digits_study.json')) as f:
    f.write(json.dumps(record, indent=1).encode())
  with checkpoints.atomic_write(os.path.join(workdir, 'digits_study.md')) as f:
    f.write(format_report(record).encode())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--sde', nargs='+', default=['vp', 've'], choices=sorted(CONFIGS),
                      help='the SDEs whose cells of the grid to run')
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  parser.add_argument('--jobs', type=int, default=2, help='commands at a time (one thread each)')
  parser.add_argument('--collect', action='store_true',
                      help='run nothing: write digits_study.json and .md from what the commands wrote in the workdir')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  os.makedirs(args.workdir, exist_ok=True)
  cells = grid(args.sde)
  start = time.time()
  failures = [] if args.collect else run_grid(args.workdir, cells, args.seeds, args.jobs)
  record = {'written': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), 'seeds': args.seeds,
            'bpd_repeats': BPD_REPEATS, 'wall_seconds_this_call': time.time() - start, 'commands': [],
            'settings': [], 'runs': [], 'failures': failures, 'real_training_images': real_image_metrics()}
  collect(args.workdir, cells, args.seeds, record)
  write_outputs(args.workdir, record)
  logging.info('Wrote %s (and digits_study.md).', os.path.join(args.workdir, 'digits_study.json'))


if __name__ == '__main__':
  main()
