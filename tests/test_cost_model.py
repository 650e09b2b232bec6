"""bench/cost_model.py at the tiny size: its instruments count what the FP estimator does (seconds)."""

import os
import runpy

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('dsm', 'fp', 'fp 1/4', 'fp forward_ad', 'fp ckpt net')


@pytest.fixture(scope='module')
def cost_model():
  return runpy.run_path(os.path.join(ROOT, 'bench', 'cost_model.py'))


@pytest.fixture(scope='module')
def results(cost_model):
  threads = torch.get_num_threads()
  try:
    out = cost_model['main'](['--tiny', '--models', 've_ncsnpp', '--variants', ','.join(VARIANTS), '--threads', '1'])
  finally:
    torch.set_num_threads(threads)
  return out['ve_ncsnpp']


def test_saved_tensor_meter_counts_live_storages_once(cost_model):
  meter = cost_model['SavedTensorMeter']()
  x = torch.ones(1000, requires_grad=True)
  with meter.hooks():
    y = x.exp()  # saves its output y
    z = (y.sin() * y.cos()).sum()  # sin and cos save y again (one storage); the product saves both factors
  assert meter.live == meter.peak == 3 * 4000
  z.backward()
  assert meter.live == 0 and meter.peak == 3 * 4000


def test_network_evaluations_match_the_estimators(results):
  for batch in (1, 2):
    assert results['dsm'][batch]['evals'] == 1
    assert results['fp'][batch]['evals'] == 3  # s at t (shared with the DSM) and the finite difference's two
    assert results['fp forward_ad'][batch]['evals'] == 1  # one dual evaluation gives s and d_t s
    assert all(results[v][batch]['recomputed'] == 0 for v in VARIANTS if v != 'fp ckpt net')
  # A quarter of a batch of 2 is 1 FP sample; the other one has its own plain forward pass.
  assert results['fp 1/4'][1]['evals'] == 3 and results['fp 1/4'][2]['evals'] == 4
  # Checkpointing recomputes the FP path's evaluations in the backward passes.
  assert results['fp ckpt net'][1]['recomputed'] > 0


def test_flops_and_saved_bytes_are_sane(results):
  for batch in (1, 2):
    dsm, fp = results['dsm'][batch], results['fp'][batch]
    assert 0 < dsm['flops'] < fp['flops'] and 0 < dsm['saved_peak'] < fp['saved_peak']
    assert 0 < dsm['loss_flops'] < dsm['flops']  # the parameter backward is counted too
    assert fp['alloc_peak'] > 0 and fp['saved_at_backward'] <= fp['saved_peak']
    assert results['fp ckpt net'][batch]['flops'] > fp['flops']  # recomputation costs FLOPs
  # Convolutions and matmuls scale with the batch exactly.
  for variant in ('dsm', 'fp', 'fp forward_ad'):
    assert results[variant][2]['flops'] == pytest.approx(2 * results[variant][1]['flops'], rel=1e-6)
  # At batch 1 the quarter is the whole batch: the same step.
  assert results['fp 1/4'][1]['flops'] == results['fp'][1]['flops']
  state = results['fp'][1]['state']
  assert state['total'] == 5 * state['params'] > 0


def test_checkpointing_does_not_change_the_step(results):
  for batch in (1, 2):
    plain, checkpointed = results['fp'][batch], results['fp ckpt net'][batch]
    assert checkpointed['loss'] == pytest.approx(plain['loss'], rel=1e-5)
    assert checkpointed['grad_norm'] == pytest.approx(plain['grad_norm'], rel=1e-4)


def test_projection_of_a_fraction_counts_fp_and_plain_samples(cost_model):
  runs = {'fp': {1: {'x': 10., 'fraction': 1.}, 2: {'x': 13., 'fraction': 1.}},
          'fp 1/4': {1: {'x': 10., 'fraction': 0.25}, 2: {'x': 11., 'fraction': 0.25}}}
  project = cost_model['project']
  assert project(runs, 'x', 'fp', 48) == 10. + 47 * 3.
  assert project(runs, 'x', 'fp 1/4', 48) == 10. + 11 * 3. + 36 * 1.  # 12 FP samples, 36 plain ones


def test_cost_model_does_not_import_tensorflow():
  import subprocess
  import sys
  code = ("import runpy, sys; sys.argv = ['bench/cost_model.py', '--help']\n"
          "try:\n  runpy.run_path('bench/cost_model.py', run_name='__main__')\nexcept SystemExit:\n  pass\n"
          "print('tensorflow imported:', 'tensorflow' in sys.modules)")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert 'tensorflow imported: False' in proc.stdout, proc.stderr[-2000:]
