"""digits_study.py: the grid's cells and commands, its orchestration (resume included), the FP weights per loss
weighting, the network-evaluation count, and the summaries and paired comparisons of the report.

The orchestration test replaces `run_command` (a `main.py` process) by a fake that writes what `main.py` writes,
so the grid's bookkeeping runs in seconds; what the commands compute is covered by the tests of main.py.
"""

import json
import math
import os
import re

import numpy as np
import pytest

import digits_study as ds
from configs.digits import default_digits_configs, fp_finetuning


def _cell(sde, setting_name, arm):
  for setting, chosen in ds.grid(['vp', 've']):
    if (setting.sde, setting.name, chosen.name) == (sde, setting_name, arm):
      return setting, chosen
  raise KeyError((sde, setting_name, arm))


WEIGHTS = {'likelihood': {'alpha': 0.1, 'beta': 0.001}, 'score_sde': {'alpha': 0.002, 'beta': 2e-5}}


def test_constants_are_the_configs():
  assert ds.PRETRAINING_STEPS == default_digits_configs.PRETRAINING_STEPS
  assert ds.FINE_TUNING_STEPS == fp_finetuning.FINE_TUNING_STEPS
  assert ds.CONFIG_SEED == ds.load_config(ds.CONFIGS['vp'], {}).seed


def test_grid_holds_every_control_cell_for_vp_and_the_deciding_ones_for_ve():
  cells = {(s.sde, s.name, a.name) for s, a in ds.grid(['vp', 've'])}
  for arm in ('pretrained', 'dsm', 'fp', 'dsm_sw', 'fp_sw', 'fp_sw_bal', 'dsm_4x', 'fp_every4'):
    assert ('vp', 'levels_p42', arm) in cells
  for arm in ('pretrained', 'dsm', 'fp', 'dsm_sw', 'fp_sw_bal'):
    assert ('vp', 'dequantized_p42', arm) in cells
  for arm in ('pretrained', 'dsm', 'fp', 'dsm_sw'):
    assert ('vp', 'levels_p43', arm) in cells
  for name in ('dequantized_p42', 'levels_p42'):
    assert {('ve', name, a) for a in ('pretrained', 'dsm', 'fp')} <= cells
  assert all(s.sde == 'vp' for s, _ in ds.grid(['vp']))
  assert len(cells) == len(ds.grid(['vp', 've']))  # no cell twice


@pytest.mark.parametrize('sde, setting_name, arm', sorted(
    {(s.sde, s.name, a.name) for s, a in ds.grid(['vp', 've'])}))
def test_every_cell_command_is_a_valid_config_with_the_cells_settings(sde, setting_name, arm):
  import run_lib
  setting, arm = _cell(sde, setting_name, arm)
  train_args, eval_args, overrides = ds.cell_commands('W', setting, arm, 1, WEIGHTS)
  config_file = ds.CONFIGS[sde] if arm.pretrained else ds.FINE_TUNING_CONFIGS[sde]
  for args in (train_args, eval_args):
    if args is None:
      continue
    assert args[0] == f'--config={config_file}' and args[1] == f'--workdir={ds.run_dir("W", setting, arm, 1)}'
    assert '--config.seed=1' in args
    assert ('--config.data.uniform_dequantization=True' in args) == setting.uniform_dequantization
  assert (train_args is None) == arm.pretrained
  config = ds.load_config(config_file, dict(overrides, **ds.eval_overrides()))
  assert config.data.uniform_dequantization == setting.uniform_dequantization
  assert config.eval.bpd_num_repeats == ds.BPD_REPEATS and config.eval.enable_conservativity
  # The one checkpoint an evaluation reads is the one the study reads back.
  assert config.eval.begin_ckpt == config.eval.end_ckpt == ds.final_checkpoint(arm)
  if not arm.pretrained:
    training = config.training
    assert training.n_iters == ds.PRETRAINING_STEPS + arm.steps
    assert training.n_iters // training.snapshot_freq == ds.final_checkpoint(arm)
    assert training.likelihood_weighting == arm.likelihood_weighting
    assert training.fp_every == arm.fp_every
    expected = WEIGHTS[arm.weights_for] if arm.fp else {'alpha': 0., 'beta': 0.}
    assert (training.alpha, training.beta) == (expected['alpha'], expected['beta'])
  # The fields main.py validates before it trains or evaluates.
  run_lib.training_settings(config)
  run_lib.eval_settings(config)


def _fake_main(calls, bpd_of):
  """A stand-in for `run_command` that writes what `main.py` writes (checkpoints, eval files, an absl log)."""

  def run(args, log_path):
    flags = dict(a[2:].split('=', 1) for a in args)
    workdir, mode = flags['workdir'], flags['mode']
    overrides = {k[len('config.'):]: v for k, v in flags.items() if k.startswith('config.')}
    fine_tuning = flags['config'] in ds.FINE_TUNING_CONFIGS.values()
    steps = int(overrides.get('training.snapshot_freq', ds.FINE_TUNING_STEPS))
    ckpt = (int(overrides.get('training.n_iters', ds.PRETRAINING_STEPS + steps)) // steps) if fine_tuning else 1
    calls.append((mode, workdir))
    if mode == 'train':
      if fine_tuning:
        assert os.path.exists(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth'))
      os.makedirs(os.path.join(workdir, 'checkpoints'), exist_ok=True)
      with open(os.path.join(workdir, 'checkpoints', f'checkpoint_{ckpt}.pth'), 'w') as f:
        f.write('state')
    else:
      assert os.path.exists(os.path.join(workdir, 'checkpoints', f'checkpoint_{ckpt}.pth'))
      eval_dir = os.path.join(workdir, 'eval')
      os.makedirs(eval_dir, exist_ok=True)
      bpd = bpd_of(workdir, overrides)
      np.savez(os.path.join(eval_dir, f'test_ckpt_{ckpt}_bpd_5.npz'), all_bpds=np.array([bpd - 0.01, bpd + 0.01]))
      np.savez(os.path.join(eval_dir, f'report_{ckpt}.npz'), mmd=0.001, digit_score=5.)
      np.savez(os.path.join(eval_dir, f'ckpt_{ckpt}_fp_residual.npz'), t=[1e-5, 1.], residual=[3., 1.],
               residual_weighted=[1., 1.], conservativity=[0.1, 0.2])
    with open(log_path, 'w') as f:
      f.write('I1202 10:00:00.000000 1 main.py:1] start\nI1202 10:00:07.500000 1 main.py:2] end\n')
    return ' '.join(args), 7.5

  return run


def test_grid_runs_every_cell_once_resumes_and_records_each_runs_settings_and_cost(tmp_path, monkeypatch):
  calls = []
  # A made-up bits/dim: FP terms -0.2, Score SDE weighting -0.1, seed s adds 0.01 s.
  bpd_of = lambda workdir, o: (2. - 0.2 * (float(o.get('training.alpha', 0.)) > 0) -
                               0.1 * (o.get('training.likelihood_weighting') == 'False') + 0.01 * int(o['seed']))
  monkeypatch.setattr(ds, 'run_command', _fake_main(calls, bpd_of))
  weight_calls = []

  def fake_weights(config_file, checkpoint, overrides):
    weight_calls.append(overrides)
    assert os.path.exists(checkpoint)
    return dict(WEIGHTS['likelihood' if overrides['training.likelihood_weighting'] else 'score_sde'])

  monkeypatch.setattr(ds, 'balanced_weights', fake_weights)
  monkeypatch.setattr(ds, 'forward_passes_per_step', lambda config_file, overrides: (64, 96))
  cells = ds.grid(['vp'])
  seeds = [0, 1, 2]
  assert ds.run_grid(str(tmp_path), cells, seeds, jobs=2) == []
  settings = ds.settings_of(cells)
  pretrainings = [w for mode, w in calls if mode == 'train' and w.endswith('pretrain')]
  assert sorted(pretrainings) == sorted(os.path.join(str(tmp_path), s.sde, s.name, 'pretrain') for s in settings)
  assert len(weight_calls) == 2 * len(settings)
  fine_tunings = [c for c in calls if c[0] == 'train' and not c[1].endswith('pretrain')]
  assert len(fine_tunings) == sum(not a.pretrained for _, a in cells) * len(seeds)
  assert len([c for c in calls if c[0] == 'eval']) == len(cells) * len(seeds)

  # A rerun finds everything done; a run whose evaluation is lost is evaluated again, not fine-tuned again.
  calls.clear()
  lost = ds.run_dir(str(tmp_path), *_cell('vp', 'levels_p42', 'fp'), 2)
  os.remove(os.path.join(lost, 'eval', 'ckpt_21_fp_residual.npz'))
  assert ds.run_grid(str(tmp_path), cells, seeds, jobs=2) == []
  assert calls == [('eval', lost)]

  record = {'written': 'now', 'seeds': seeds, 'commands': [], 'settings': [], 'runs': []}
  ds.collect(str(tmp_path), cells, seeds, record)
  ds.write_outputs(str(tmp_path), record)
  assert len(record['runs']) == len(cells) * len(seeds)
  for run in record['runs']:
    for field in ('sde', 'seed', 'pretrain_seed', 'alpha', 'beta', 'likelihood_weighting', 'uniform_dequantization',
                  'fp_every', 'train_seconds', 'network_evals', 'nll_bpd', 'nll_bpd_stderr', 'fp_residual_mean',
                  'conservativity', 'mmd', 'digit_score'):
      assert field in run, field
    assert run['nll_bpd_stderr'] == pytest.approx(0.01)  # two passes of one image: std([a, b]) / sqrt(2)
  by = {(r['setting'], r['arm'], r['seed']): r for r in record['runs']}
  assert by[('levels_p43', 'fp', 0)]['pretrain_seed'] == 43
  assert by[('dequantized_p42', 'dsm', 0)]['uniform_dequantization'] is True
  assert by[('levels_p42', 'pretrained', 0)]['train_seconds'] == 0 == by[('levels_p42', 'pretrained', 0)]['network_evals']
  assert by[('levels_p42', 'dsm', 0)]['network_evals'] == 200 * 64
  assert by[('levels_p42', 'fp', 0)]['network_evals'] == 200 * 96
  assert by[('levels_p42', 'fp_every4', 0)]['network_evals'] == 50 * 96 + 150 * 64
  assert by[('levels_p42', 'dsm_4x', 0)]['network_evals'] == 800 * 64
  assert by[('levels_p42', 'fp_sw_bal', 1)]['alpha'] == WEIGHTS['score_sde']['alpha']
  assert by[('levels_p42', 'fp_sw', 1)]['alpha'] == WEIGHTS['likelihood']['alpha']
  assert by[('levels_p42', 'dsm_sw', 1)]['likelihood_weighting'] is False
  assert by[('levels_p42', 'fp', 1)]['nll_bpd'] == pytest.approx(1.81)

  rows = {(r['group'], r['first'], r['second']): r for r in record['paired']}
  fp_vs_sw = rows[('vp levels_p42', 'fp', 'dsm_sw')]['metrics']['nll_bpd']
  assert fp_vs_sw['per_pair'] == pytest.approx([-0.1] * 3) and fp_vs_sw['mean'] == pytest.approx(-0.1)
  assert rows[('vp levels_p42', 'fp_sw', 'dsm_sw')]['metrics']['nll_bpd']['mean'] == pytest.approx(-0.2)
  assert rows[('vp levels_p42', 'fp', 'dsm')]['cost']['network_evals'] == [200 * 96, 200 * 64]
  # Pooled over the two pretraining seeds: 6 pairs.
  assert len(rows[('vp levels_p42+43', 'fp', 'dsm')]['pairs']) == 6
  assert ('vp levels_p43', 'fp_sw', 'dsm_sw') not in rows  # not in the grid for that setting
  assert ('vp levels_p42+43', 'fp_sw', 'dsm_sw') not in rows  # nor pooled: it would repeat levels_p42's row

  with open(os.path.join(str(tmp_path), 'digits_study.json')) as f:
    assert json.load(f)['runs'] == record['runs']
  with open(os.path.join(str(tmp_path), 'digits_study.md')) as f:
    report = f.read()
  assert '| vp levels_p42 | fp − dsm_sw |' in report and '| vp levels_p42+43 | fp − dsm |' in report
  assert report.count('| vp dequantized_p42 | fp_sw_bal | ') == 3 + 1  # every run, and the per-arm row
  assert re.search(r'\| vp levels_p42 \| fp − dsm \| [^|]+ \| 3 \| -0\.2000 ± 0\.0000 \|', report)


def test_interrupted_fine_tuning_resumes_from_its_own_checkpoint(tmp_path, monkeypatch):
  setting, arm = _cell('vp', 'levels_p42', 'fp')
  os.makedirs(os.path.dirname(ds.pretrained_checkpoint(str(tmp_path), setting)))
  with open(ds.pretrained_checkpoint(str(tmp_path), setting), 'w') as f:
    f.write('pretrained')
  for weighting in WEIGHTS:
    with open(ds.weights_path(str(tmp_path), setting, weighting), 'w') as f:
      json.dump(WEIGHTS[weighting], f)
  meta = os.path.join(ds.run_dir(str(tmp_path), setting, arm, 0), 'checkpoints-meta', 'checkpoint.pth')
  os.makedirs(os.path.dirname(meta))
  with open(meta, 'w') as f:
    f.write('step 4150')
  monkeypatch.setattr(ds, 'run_command', _fake_main([], lambda w, o: 2.))
  ds.run_cell(str(tmp_path), setting, arm, 0)
  with open(meta) as f:
    assert f.read() == 'step 4150'


@pytest.fixture(scope='module')
def pretrained_vp(tmp_path_factory):
  """A randomly initialized checkpoint of the DIGITS VP model (what balanced_weights restores)."""
  import torch
  import checkpoints
  import run_lib
  config = ds.load_config(ds.FINE_TUNING_CONFIGS['vp'], {})
  config.device = torch.device('cpu')
  torch.manual_seed(0)
  path = str(tmp_path_factory.mktemp('vp') / 'checkpoint_1.pth')
  checkpoints.save_checkpoint(path, run_lib.build_state(config))
  return path


def test_balanced_weights_follow_the_loss_weighting_and_only_it(pretrained_vp):
  likelihood = ds.balanced_weights(ds.FINE_TUNING_CONFIGS['vp'], pretrained_vp, {'training.likelihood_weighting': True})
  score_sde = ds.balanced_weights(ds.FINE_TUNING_CONFIGS['vp'], pretrained_vp, {'training.likelihood_weighting': False})
  terms, other = likelihood['terms_at_start'], score_sde['terms_at_start']
  # The FP terms carry their own weight lambda(t) = g(t)^2: the DSM weighting leaves them unchanged.
  assert other['fp_vector'] == pytest.approx(terms['fp_vector'], rel=1e-6)
  assert other['fp_scalar'] == pytest.approx(terms['fp_scalar'], rel=1e-6)
  assert other['dsm'] != pytest.approx(terms['dsm'], rel=1e-2)
  for weights in (likelihood, score_sde):
    t = weights['terms_at_start']
    assert weights['alpha'] * t['fp_vector'] == pytest.approx(0.5 * t['dsm'])
    assert weights['beta'] * t['fp_scalar'] == pytest.approx(0.5 * t['dsm'])


def test_balanced_weights_read_dequantized_batches_when_the_setting_says_so(pretrained_vp, monkeypatch):
  import datasets
  seen = []
  get_data = datasets.get_data

  def spy(config):
    data = get_data(config)
    batches = data.train_batches

    def recorded(*args, **kwargs):
      for batch in batches(*args, **kwargs):
        levels = (batch.numpy() + 1.) / 2. * 16.  # exact data are k/16 in [0, 1], scaled to [-1, 1]
        seen.append((config.data.uniform_dequantization, float(np.abs(levels - np.round(levels)).max())))
        yield batch

    data.train_batches = recorded
    return data

  monkeypatch.setattr(datasets, 'get_data', spy)
  ds.balanced_weights(ds.FINE_TUNING_CONFIGS['vp'], pretrained_vp, {})
  ds.balanced_weights(ds.FINE_TUNING_CONFIGS['vp'], pretrained_vp, {'data.uniform_dequantization': True})
  exact = [gap for dequantized, gap in seen if not dequantized]
  spread = [gap for dequantized, gap in seen if dequantized]
  assert len(exact) == len(spread) == ds.ALPHA_BATCHES
  assert max(exact) < 1e-5 and min(spread) > 0.1


def test_forward_passes_count_the_fp_terms_on_their_fraction_of_the_batch():
  config = ds.load_config(ds.FINE_TUNING_CONFIGS['vp'], {})
  batch, fraction = config.training.batch_size, config.training.fp_batch_fraction
  dsm_step, fp_step = ds.forward_passes_per_step(ds.FINE_TUNING_CONFIGS['vp'], ())
  assert dsm_step == batch
  # The FP terms call the network twice more per sample of their share (the finite difference's evaluations
  # at t - h and t + h); the evaluation at t serves the DSM term too, and the divergences are backward passes.
  assert fp_step == batch + 2 * int(batch * fraction)


def test_summary_is_the_mean_and_students_t_interval_over_seeds():
  runs = [{'sde': 'vp', 'setting': 'levels_p42', 'arm': 'fp', 'nll_bpd': v, 'nll_bpd_stderr': 0.01,
           'fp_residual_mean': 1., 'conservativity': None, 'train_seconds': 10., 'network_evals': 5}
          for v in (1., 2., 3.)]
  (row,) = ds.summarize(runs)
  assert row['num_seeds'] == 3 and 'conservativity' not in row
  # std([1, 2, 3], ddof=1) = 1: half width t_{0.975, 2} / sqrt(3).
  assert row['nll_bpd'] == {'mean': 2., 'ci95': pytest.approx(4.3026527 / math.sqrt(3), rel=1e-7)}
  assert row['fp_residual_mean'] == {'mean': 1., 'ci95': 0.}
  assert row['nll_bpd_stderr_mean'] == pytest.approx(0.01) and row['train_seconds'] == 10.


def test_pairs_leave_out_a_seed_one_arm_did_not_finish():
  runs = [{'sde': 'vp', 'setting': 'levels_p42', 'uniform_dequantization': False, 'arm': arm, 'seed': seed,
           'nll_bpd': 2. + seed + (0.1 * seed if arm == 'fp' else 0.), 'conservativity': 0.1,
           'train_seconds': 1., 'network_evals': 1}
          for arm in ('dsm', 'fp') for seed in (0, 1, 2)][:-1]
  (row,) = ds.paired_differences(runs)
  assert (row['first'], row['second']) == ('fp', 'dsm') and row['pairs'] == [['levels_p42', 0], ['levels_p42', 1]]
  assert row['metrics']['nll_bpd']['per_pair'] == pytest.approx([0., 0.1])
  assert row['metrics']['nll_bpd']['mean'] == pytest.approx(0.05)
  assert row['metrics']['conservativity']['per_pair'] == [0., 0.]


def test_a_shrunk_cell_trains_evaluates_and_reads_back(tmp_path, monkeypatch):
  """A grid cell's loss and data overrides through run_lib.train and run_lib.evaluate at tiny size (16 training
  and 8 test images, nf 8, 4 steps), then `read_results` on what the evaluation wrote (its real file formats).
  The cell with the most non-default settings: dequantized data, DSM + FP under Score SDE's weighting (lazy FP
  steps are covered by tests/test_lazy_regularization.py)."""
  setting_name, arm = 'dequantized_p42', 'fp_sw_bal'
  import torch
  import datasets
  import run_lib
  from tests import configs_tiny
  full = datasets.load_digits_splits()
  subset = {'train': tuple(a[:16] for a in full['train']), 'test': tuple(a[:8] for a in full['test'])}
  monkeypatch.setattr(datasets, 'load_digits_splits', lambda: subset)
  setting, arm = _cell('vp', setting_name, arm)
  overrides = ds.arm_overrides(setting, arm, 1, WEIGHTS)
  # The cell's loss and data settings, at tiny size: not its step counts.
  overrides = {k: v for k, v in overrides.items() if k not in ('training.n_iters', 'training.snapshot_freq')}
  eval_overrides = dict(ds.eval_overrides(), **{'eval.batch_size': 8, 'eval.num_samples': 8})
  config = configs_tiny.tiny_schedule(ds.load_config(ds.FINE_TUNING_CONFIGS['vp'], dict(overrides, **eval_overrides)))
  config.device = torch.device('cpu')
  config.model.nf = 8
  config.training.snapshot_sampling = False
  config.training.alpha, config.training.beta = overrides['training.alpha'], overrides['training.beta']
  config.eval.begin_ckpt = config.eval.end_ckpt = 2
  config.eval.enable_sampling = True
  config.eval.fp_residual_num_times = 2
  config.sampling.corrector = 'none'
  assert config.data.uniform_dequantization == setting.uniform_dequantization
  assert config.training.likelihood_weighting == arm.likelihood_weighting and config.training.fp_every == arm.fp_every
  workdir = str(tmp_path / 'w')
  run_lib.train(config, workdir)
  run_lib.evaluate(config, workdir)
  results = ds.read_results(workdir, 2)
  assert np.isfinite(results['nll_bpd']) and results['nll_bpd'] > 0
  assert np.isfinite(results['nll_bpd_stderr']) and results['nll_bpd_stderr'] >= 0  # 2 passes: a standard error
  assert np.isfinite(results['conservativity']) and len(results['conservativity_vs_t']) == 2
  assert len(results['fp_residual_vs_t']['t']) == 2 and np.isfinite(results['fp_residual_mean'])
  assert {'mmd', 'digit_score'} <= set(results)
