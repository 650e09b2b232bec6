"""compare.py (`main.py --mode compare`): two evaluation folders written by the test, paired and tabulated."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

import compare
import likelihood
from tests import configs_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_eval(folder, ckpt, bpd_rounds, offset=0., curves=True, report=True):
  """Result files of `run_lib.evaluate` for checkpoint `ckpt`, with each bits/dim value shifted by `offset`."""
  os.makedirs(folder, exist_ok=True)
  for r, values in enumerate(bpd_rounds):
    np.savez(os.path.join(folder, f'test_ckpt_{ckpt}_bpd_{r}.npz'), np.asarray(values) + offset)
  np.savez(os.path.join(folder, f'ckpt_{ckpt}_loss.npz'), all_losses=np.array([1.0 + offset]),
           mean_loss=np.float64(1.0 + offset))
  if curves:
    t = np.array([0.01, 0.1, 1.])
    np.savez(os.path.join(folder, f'ckpt_{ckpt}_fp_residual.npz'), t=t, residual=np.array([3., 2., 1.]) + offset,
             conservativity=np.array([.1, .2, .3]))
  if report:
    np.savez(os.path.join(folder, f'report_{ckpt}.npz'), IS=np.float64(5.), fid=np.float64(30. + offset),
             kid=np.float64(.01))


def _rounds(rng, num_rounds, batch=4):
  return [rng.normal(3., .1, batch) for _ in range(num_rounds)]


def test_paired_difference_over_passes_and_over_batches():
  rng = np.random.default_rng(0)
  base = _rounds(rng, 6)
  shift = [rng.normal(-.05, .01, 4) for _ in range(6)]
  tuned = [b + s for b, s in zip(base, shift)]
  # Three passes of two batches: the pass means of the differences are the units.
  out = compare.paired_bpd(tuned, base, num_repeats=3)
  d = np.concatenate(shift).reshape(3, -1).mean(axis=1)
  assert out['units'] == '3 passes'
  assert out['difference'] == pytest.approx(d.mean())
  assert out['difference_se'] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
  half = stats.t.ppf(.975, 2) * out['difference_se']
  assert out['difference_ci95'] == pytest.approx([d.mean() - half, d.mean() + half])
  assert (out['bpd'], out['bpd_se']) == pytest.approx(likelihood.bpd_summary(np.concatenate(tuned), 3))
  assert out['baseline_bpd'] == pytest.approx(np.concatenate(base).mean())
  # One pass: the batches are the units.
  out = compare.paired_bpd(tuned, base, num_repeats=1)
  d = np.array([s.mean() for s in shift])
  assert out['units'] == '6 batches' and math.isnan(out['bpd_se'])
  assert out['difference_se'] == pytest.approx(d.std(ddof=1) / math.sqrt(6))
  assert out['difference_ci95'][1] < 0  # the shift is clearly negative


def test_batches_that_do_not_pair_are_one_line_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(compare.CompareError, match='W has 6 bits/dim batches, B 4'):
    compare.paired_bpd(_rounds(rng, 6), _rounds(rng, 4), 1, names=('W', 'B'))
  with pytest.raises(compare.CompareError, match='sizes differ'):
    compare.paired_bpd(_rounds(rng, 2), _rounds(rng, 2, batch=3), 1)
  with pytest.raises(compare.CompareError, match='do not split into eval.bpd_num_repeats=4'):
    compare.paired_bpd(_rounds(rng, 6), _rounds(rng, 6), 4)


def test_compare_workdirs_writes_table_json_and_plot(tmp_path):
  rng = np.random.default_rng(1)
  rounds = _rounds(rng, 4)
  _write_eval(str(tmp_path / 'B' / 'eval'), 26, rounds)
  _write_eval(str(tmp_path / 'W' / 'eval'), 27, [r + 1. for r in rounds], offset=-.02)
  _write_eval(str(tmp_path / 'W' / 'eval'), 28, rounds, offset=-.05)  # the last one: the default
  config = configs_tiny.get_config()
  config.eval.bpd_num_repeats = 2
  table = compare.compare_workdirs(config, str(tmp_path / 'W'), str(tmp_path / 'B'))
  stem = tmp_path / 'W' / 'eval' / 'compare_28_vs_26'
  assert open(f'{stem}.txt').read() == table
  lines = table.splitlines()
  assert lines[0].endswith('ckpt 28 vs baseline ' + str(tmp_path / 'B' / 'eval') + ' ckpt 26')
  bpd_line = next(line for line in lines if line.startswith('test bits/dim'))
  assert '-0.050000, 95% [-0.050000, -0.050000] (paired, 2 passes)' in bpd_line
  assert any(line.startswith('residual (mean over t)') and line.endswith('-0.050000') for line in lines)
  assert any(line.startswith('conservativity (mean over t)') for line in lines)
  assert any(line.startswith('fid') and line.endswith('-0.0500') for line in lines)
  numbers = json.load(open(f'{stem}.json'))
  assert numbers['bpd']['difference'] == pytest.approx(-.05) and numbers['metrics']['IS'] == [5., 5.]
  assert numbers['curves']['residual'] == pytest.approx([1.95, 2.])
  assert open(f'{stem}.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  assert not [n for n in os.listdir(tmp_path / 'W' / 'eval') if n.endswith('.tmp')]
  # A chosen checkpoint: 27 against 26.
  compare.compare_workdirs(config, str(tmp_path / 'W'), str(tmp_path / 'B'), ckpt=27)
  numbers = json.load(open(tmp_path / 'W' / 'eval' / 'compare_27_vs_26.json'))
  assert numbers['bpd']['difference'] == pytest.approx(.98)


def test_missing_folders_and_files_are_named(tmp_path):
  config = configs_tiny.get_config()
  rng = np.random.default_rng(2)
  with pytest.raises(compare.CompareError, match=r'--baseline_workdir=.*B: the folder does not exist'):
    compare.compare_workdirs(config, str(tmp_path), str(tmp_path / 'B'))
  os.makedirs(tmp_path / 'B')
  with pytest.raises(compare.CompareError, match=r"The evaluation folder '.*eval' does not exist: run --mode eval"):
    compare.compare_workdirs(config, str(tmp_path), str(tmp_path / 'B'))
  _write_eval(str(tmp_path / 'eval'), 3, _rounds(rng, 2))
  os.makedirs(tmp_path / 'B' / 'eval')
  with pytest.raises(compare.CompareError, match='holds no evaluation results'):
    compare.compare_workdirs(config, str(tmp_path), str(tmp_path / 'B'))
  _write_eval(str(tmp_path / 'B' / 'eval'), 1, [], curves=False, report=False)
  with pytest.raises(compare.CompareError, match=r'--baseline_ckpt=2: .* has no results for checkpoint 2; it has \[1\]'):
    compare.compare_workdirs(config, str(tmp_path), str(tmp_path / 'B'), baseline_ckpt=2)
  with pytest.raises(compare.CompareError, match='Only one folder has bits/dim files'):
    compare.compare_workdirs(config, str(tmp_path), str(tmp_path / 'B'))
  os.remove(tmp_path / 'eval' / 'test_ckpt_3_bpd_0.npz')
  with pytest.raises(compare.CompareError, match=r'rounds \[1\], not 0..N-1'):
    compare.compare_workdirs(config, str(tmp_path), str(tmp_path / 'B'))


def test_main_compare_mode(tmp_path):
  rng = np.random.default_rng(3)
  rounds = _rounds(rng, 2)
  _write_eval(str(tmp_path / 'B' / 'ev'), 26, rounds)
  _write_eval(str(tmp_path / 'W' / 'ev'), 28, rounds, offset=.1, report=False)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
  base = [sys.executable, 'main.py', f'--config={ROOT}/tests/configs_tiny.py', f'--workdir={tmp_path / "W"}',
          '--mode=compare', '--eval_folder=ev']
  result = subprocess.run(base + [f'--baseline_workdir={tmp_path / "B"}'], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '(paired, 2 batches)' in result.stderr and 'fid' not in open(tmp_path / 'W' / 'ev' /
                                                                        'compare_28_vs_26.txt').read()
  assert 'Comparison:' in open(tmp_path / 'W' / 'stdout.txt').read()
  result = subprocess.run(base + [f'--baseline_workdir={tmp_path / "B"}', '--baseline_ckpt=5'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert 'compare failed: CompareError: --baseline_ckpt=5:' in result.stderr and 'Traceback' not in result.stderr
