"""Tests of the regularizer study (`python study.py`): the interval math against known answers, the
plan of runs, and the quick study end to end (study.json's schema, the table, the plot, resuming)."""

import json
import math
import os

import numpy as np
import pytest
import torch

import study
import utils


def test_t_interval_known_answers():
  # [1, 2, 3]: mean 2, sample sd 1, t_{0.975, 2} = 4.302652729749464 (tables of Student's t).
  mean, hw = utils.t_interval([1., 2., 3.])
  assert mean == pytest.approx(2.) and hw == pytest.approx(4.302652729749464 / math.sqrt(3.), rel=1e-12)
  # Two values a +- d: sd = d sqrt(2), t_{0.975, 1} = 12.706204736174698.
  mean, hw = utils.t_interval([0.5, 1.5])
  assert mean == pytest.approx(1.) and hw == pytest.approx(12.706204736174698 * math.sqrt(0.5) / math.sqrt(2.))
  mean, hw = utils.t_interval([7.])
  assert mean == 7. and math.isnan(hw)
  assert utils.t_interval([4., 4., 4.]) == (4., 0.)


def test_read_npz_reads_every_array_and_no_pickle(tmp_path):
  path = str(tmp_path / 'a.npz')
  np.savez(path, x=np.arange(3), y=np.eye(2))
  arrays = utils.read_npz(path)
  assert isinstance(arrays, dict) and sorted(arrays) == ['x', 'y']
  assert arrays['x'].tolist() == [0, 1, 2] and arrays['y'].tolist() == [[1., 0.], [0., 1.]]
  np.savez(path, obj=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match='allow_pickle'):
    utils.read_npz(path)


def test_standard_error_known_answers():
  assert utils.standard_error([1., 2., 3.]) == pytest.approx(1. / math.sqrt(3.), rel=1e-12)
  assert utils.standard_error([0.5, 1.5]) == pytest.approx(math.sqrt(0.5) / math.sqrt(2.), rel=1e-12)
  assert math.isnan(utils.standard_error([7.])) and math.isnan(utils.standard_error([]))


def test_plan_spans_three_decades_with_zero_and_every_ablation():
  runs = study.plan_runs()
  grid = [r for r in runs if r['ablation'] is None]
  alphas = sorted({r['alpha'] for r in grid})
  assert alphas[0] == 0. and alphas[-1] / alphas[1] >= 1e3
  assert study.ABLATION_ALPHA in alphas  # the ablations' alpha has its baseline in the grid
  for sde in ('ve', 'vp'):
    for alpha in alphas:
      assert sorted(r['seed'] for r in grid if r['sde'] == sde and r['alpha'] == alpha) == list(study.SEEDS)
  assert len(study.SEEDS) >= 3
  assert {r['ablation'] for r in runs} == {None, *study.ABLATIONS}
  # EMA off changes DSM alone too, so its alpha = 0 run is there; the FP-only ablations have none.
  assert {r['alpha'] for r in runs if r['ablation'] == 'no_ema'} == {0., study.ABLATION_ALPHA}
  assert {r['alpha'] for r in runs if r['ablation'] == 'wgt_constant'} == {study.ABLATION_ALPHA}
  assert len({study.run_name(r) for r in runs}) == len(runs)


def test_run_config_applies_the_run():
  run = dict(sde='vp', alpha=1e-3, seed=2, ablation='scalar_on')
  config = study.run_config(run, 'gmm', quick=False)
  assert config.training.alpha == 1e-3 and config.seed == 2 and config.training.sde == 'vpsde'
  assert config.training.scalar_fp == 'both' and config.training.beta == study.ABLATION_ALPHA
  assert config.training.n_iters == 6500  # the demo's VP fine-tuning, from the 6000 steps of pretraining
  assert study.run_config(dict(run, sde='ve'), 'gmm', quick=False).training.n_iters == 3500
  assert config.eval.num_samples == study.EVAL_SIZES['eval.num_samples']
  assert study.run_config(dict(run, ablation='no_ema'), 'gmm', False).model.ema_rate == 0.


def test_summarize_and_table():
  runs = [dict(sde='ve', alpha=0., seed=s, ablation=None, nll_bpd=v, fp_residual_mean=10. * v, conservativity=None,
               swd=0.1, mmd=1e-3, dsm_loss=0.5) for s, v in enumerate((1., 2., 3.))]
  (row,) = study.summarize(runs)
  assert row['n'] == 3 and row['nll_bpd'] == utils.t_interval([1., 2., 3.])
  assert math.isnan(row['conservativity'][0])
  table = study.format_table([row], true_nll=0.8)
  assert f'2.0000 ± {4.302652729749464 / math.sqrt(3):.4f}' in table
  assert '| VE | baseline | 0 | 3 |' in table and 'True NLL' in table


@pytest.fixture
def one_thread():
  # The study's ops are tiny: a second thread only waits on the first, and on a shared machine it costs up to
  # 10x (as demo.main, the study runs on one thread).
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(previous)


@pytest.mark.usefixtures('one_thread')
def test_quick_study_end_to_end_and_resumes(tmp_path):
  workdir = str(tmp_path)
  # Two shards share the study: the first leaves runs missing and writes nothing, the second writes it all.
  assert study.run_study(workdir, 'gmm', quick=True, shard=(0, 2)) is None
  assert not os.path.exists(os.path.join(workdir, 'study.json'))
  result = study.run_study(workdir, 'gmm', quick=True, shard=(1, 2))
  with open(os.path.join(workdir, 'study.json')) as f:
    saved = json.load(f)
  runs = saved['runs']
  assert len(runs) == len(result['runs']) > 0
  for run in runs:
    for key in ('sde', 'alpha', 'seed', 'nll_bpd', 'fp_residual_mean', 'conservativity', 'swd', 'mmd'):
      assert key in run, key
    for key in ('nll_bpd', 'nll_gap_bpd', 'fp_residual_mean', 'conservativity', 'swd', 'mmd'):
      assert math.isfinite(run[key]), (study.run_name(run), key)
    assert 0 <= run['conservativity'] <= 2  # ||J - J^T|| <= 2 ||J||
  assert {r['sde'] for r in runs} == {'ve', 'vp'} and 0. in {r['alpha'] for r in runs}
  assert {r['ablation'] for r in runs} == {None, *study.ABLATIONS}
  for sde in ('ve', 'vp'):
    terms = saved['start_terms'][sde]['baseline']
    assert terms['dsm']['mean'] > 0 and terms['fp_vector']['mean'] > 0
  assert 'fp_scalar' in saved['start_terms']['ve']['scalar_on']
  with open(os.path.join(workdir, 'study.md')) as f:
    table = f.read()
  # The table holds each group's mean and interval, as study.json's summary does.
  summary = saved['summary']
  row = next(r for r in summary if r['sde'] == 'vp' and r['alpha'] == 0. and r['ablation'] is None)
  mean, hw = utils.t_interval([r['nll_bpd'] for r in runs if r['sde'] == 'vp' and r['alpha'] == 0.
                               and r['ablation'] is None])
  assert row['nll_bpd'] == pytest.approx([mean, hw])
  assert f'{mean:.4f} ± {hw:.4f}' in table
  with open(os.path.join(workdir, 'study.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # The gap is to the true NLL of the run's own test set (drawn from its seed).
  seed0 = next(r for r in runs if r['seed'] == 0)
  assert seed0['nll_gap_bpd'] == pytest.approx(seed0['nll_bpd'] - study.demo.reference_row(
      study.run_config(dict(seed0), 'gmm', True))['nll_bpd'])
  # Paired with DSM alone of the same seed; zero for DSM alone itself.
  fp = next(r for r in runs if r['sde'] == 've' and r['seed'] == 1 and r['alpha'] == 1. and not r['ablation'])
  base = next(r for r in runs if r['sde'] == 've' and r['seed'] == 1 and r['alpha'] == 0. and not r['ablation'])
  assert fp['nll_vs_dsm_bpd'] == pytest.approx(fp['nll_bpd'] - base['nll_bpd']) and base['nll_vs_dsm_bpd'] == 0.
  assert fp['conservativity_vs_dsm'] == pytest.approx(fp['conservativity'] - base['conservativity'])
  # Resuming: every finished run is read back, not trained again.
  derived = ('nll_gap_bpd', 'nll_vs_dsm_bpd', 'conservativity_vs_dsm')
  first = {k: v for k, v in runs[0].items() if k not in derived}
  again = study.execute_run({k: first[k] for k in ('sde', 'alpha', 'seed', 'ablation')}, workdir, None, 'gmm',
                            True)
  assert again == first


def test_bad_ablation_sde_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"--study_ablation_sdes=\['sub'\].*allowed: \['ve', 'vp'\]"):
    study.run_study(str(tmp_path), 'gmm', quick=True, ablation_sdes=('sub',))
  with pytest.raises(ValueError, match=r'--study_shard=2/2: the shard must be in 0..1'):
    study.run_study(str(tmp_path), 'gmm', quick=True, shard=(2, 2))


def test_ema_off_ablation_reaches_the_fine_tuning_checkpoint(tmp_path):
  import checkpoints
  import run_lib
  import utils
  # A restored checkpoint's EMA decay overrides model.ema_rate, so the copy must carry the run's decay.
  config = study.run_config(dict(sde='ve', alpha=0.01, seed=0, ablation='no_ema'), 'gmm', quick=True)
  state = run_lib.build_state(study.demo.get_demo_config('ve', 'dsm', 'gmm', quick=True))
  utils.save_checkpoint(str(tmp_path / 'pre' / 'checkpoints-meta' / 'checkpoint.pth'), state)
  study.demo.copy_checkpoint(str(tmp_path / 'pre'), str(tmp_path / 'off'), config.model.ema_rate)
  study.demo.copy_checkpoint(str(tmp_path / 'pre'), str(tmp_path / 'on'), 0.999)
  off = checkpoints.load_checkpoint_file(str(tmp_path / 'off' / 'checkpoints-meta' / 'checkpoint.pth'))
  on = checkpoints.load_checkpoint_file(str(tmp_path / 'on' / 'checkpoints-meta' / 'checkpoint.pth'))
  assert off['ema']['decay'] == 0. and on['ema']['decay'] == 0.999
  restored = run_lib.build_state(config)
  utils.restore_checkpoint(str(tmp_path / 'off' / 'checkpoints-meta' / 'checkpoint.pth'), restored, 'cpu')
  assert restored['ema'].decay == 0.
  for a, b in zip(off['model'].values(), state['model'].state_dict().values()):
    assert torch.equal(a, b)
