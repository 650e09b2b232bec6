"""End-to-end test of the embedded demo (`demo.py --quick`): run_lib.train and run_lib.evaluate for the four toy
configs, the printed tables, the figures and results.json."""

import json
import math
import os
import subprocess
import sys

import pytest

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flatten(config):
  return {f'{section}.{key}': value for section, fields in config.items() if isinstance(fields, dict)
          for key, value in fields.items()}


def test_configs_differ_only_by_the_fp_term():
  for sde in demo.SDES:
    dsm = _flatten(demo.get_demo_config(sde, 'dsm', 'gmm', quick=False).to_dict())
    fp = _flatten(demo.get_demo_config(sde, 'fp', 'gmm', quick=False).to_dict())
    assert dsm.keys() == fp.keys()
    differing = {key for key in dsm if dsm[key] != fp[key]}
    # The paired comparison is fair: the FP configs change only the regularizer's weights.
    assert differing == {'training.alpha'}, differing
    # Only the vector residual (zero for the true score) is penalized; see configs/toy/default_toy_configs.py.
    assert fp['training.alpha'] > 0 and fp['training.beta'] == 0 and fp['training.scalar_fp'] == 'False'
    assert dsm['training.alpha'] == 0
    assert fp['training.fp_divergence'] == 'exact' and fp['data.toy'] == 'gmm'


def test_quick_demo_runs_end_to_end(tmp_path):
  workdir = str(tmp_path / 'demo')
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='2')
  proc = subprocess.run([sys.executable, 'demo.py', '--quick', '--workdir', workdir, '--toy', 'checkerboard'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = proc.stdout
  assert 'VE SDE on checkerboard' in out and 'VP SDE on checkerboard' in out
  # Progress lines for every stage.
  for stage in range(1, 7):
    assert f'[{stage}/6]' in proc.stderr
  for name in ('residual_vs_t_ve.png', 'residual_vs_t_vp.png', 'samples_ve.png', 'samples_vp.png'):
    path = os.path.join(workdir, name)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert set(results) == {'ve', 'vp'}
  for sde, rows in results.items():
    assert set(rows) == {'DSM', 'DSM + FP', 'true samples'}
    for label in ('DSM', 'DSM + FP'):
      row = rows[label]
      for key in ('nll_bpd', 'fp_residual_mean', 'conservativity', 'swd', 'mmd', 'dsm_loss'):
        assert row[key] is not None and math.isfinite(row[key]), (sde, label, key, row[key])
      assert row['fp_residual_mean'] >= 0 and row['swd'] >= 0 and 0 <= row['conservativity'] <= 2
      assert len(row['t']) == len(row['residual']) == 3
      # The table prints the same numbers.
      assert f'{row["nll_bpd"]:.4f}' in out and f'{row["swd"]:.4f}' in out
      assert f'{row["conservativity"]:.4f}' in out
    # Checkerboard: the true NLL is log2(8) / 2 = 1.5 bits/dim exactly.
    assert rows['true samples']['nll_bpd'] == pytest.approx(1.5)
    assert rows['true samples']['fp_residual_mean'] is None and rows['true samples']['conservativity'] is None


def test_workdir_pretrained_for_other_steps_is_refused(tmp_path):
  import run_lib
  import utils
  config = demo.get_demo_config('ve', 'dsm', 'checkerboard', quick=True)
  state = run_lib.build_state(config)
  state['step'] = 3  # --quick pretrains for n_iters // 2 = 5 steps
  meta = tmp_path / 'checkerboard_ve_pretrain_quick' / 'checkpoints-meta' / 'checkpoint.pth'
  utils.save_checkpoint(str(meta), state)
  with pytest.raises(ValueError, match=r'pretrained for 3 steps, not --pretrain_iters=5; use another --workdir'):
    demo.run_demo(str(tmp_path), 'checkerboard', quick=True)


@pytest.mark.parametrize('sde,default_steps', [('ve', 3000), ('vp', 6000)])
def test_pretraining_steps_default_to_each_sdes_config(tmp_path, sde, default_steps):
  import run_lib
  import utils
  config = demo.get_demo_config(sde, 'dsm', 'gmm', quick=False)
  assert config.training.n_iters - demo.FINE_TUNE_ITERS == default_steps
  state = run_lib.build_state(config)
  state['step'] = 100
  utils.save_checkpoint(str(tmp_path / f'gmm_{sde}_pretrain' / 'checkpoints-meta' / 'checkpoint.pth'), state)
  # The workdir check runs before any training step: the message names the default this SDE would use.
  with pytest.raises(ValueError, match=rf'pretrained for 100 steps, not --pretrain_iters={default_steps};'):
    demo.pretrain(str(tmp_path), sde, 'gmm')
  n_iters = config.training.n_iters
  with pytest.raises(ValueError, match=rf'--pretrain_iters={n_iters} must be in \(0, {n_iters}\)'):
    demo.pretrain(str(tmp_path), sde, 'gmm', pretrain_iters=n_iters)
