"""run_lib.evaluate with `eval.enable_conservativity`: the per-t array in `ckpt_{ckpt}_fp_residual.npz`, its
TensorBoard scalars, and the validation of `eval.conservativity_num_probes`."""

import logging
import os
import shutil

import ml_collections
import numpy as np
import pytest
import torch

import run_lib
import score_fpe
import utils
from models.ema import ExponentialMovingAverage
from tests import configs_tiny

RESIDUAL_KEYS = {'t', 'residual', 'residual_weighted', 'scalar', 'time_derivative'}


def _eval_only_conservativity(config, num_times=3):
  e = config.eval
  e.enable_loss = e.enable_bpd = e.enable_sampling = e.enable_fp_residual = False
  e.enable_conservativity = True
  e.fp_residual_num_times = num_times
  e.begin_ckpt = e.end_ckpt = 1
  return config


@pytest.fixture(scope='module')
def toy_workdir(tmp_path_factory):
  """checkpoint_1 of the toy MLP (2-D data, so the exact Jacobian), random weights: no training needed."""
  workdir = tmp_path_factory.mktemp('toy') / 'w'
  (workdir / 'checkpoints').mkdir(parents=True)
  config = configs_tiny.get_toy_config()
  torch.manual_seed(0)
  state = run_lib.build_state(config)  # pylint: disable=protected-access
  with torch.no_grad():
    for p in state['model'].parameters():
      p.add_(0.3 * torch.randn_like(p))  # away from the zero-output initialization
  # Evaluation uses the EMA weights: make them the perturbed ones.
  state['ema'] = ExponentialMovingAverage(state['model'].parameters(), decay=config.model.ema_rate)
  utils.save_checkpoint(str(workdir / 'checkpoints' / 'checkpoint_1.pth'), state)
  return str(workdir)


class RecordingWriter:
  """Stands in for TensorBoard's SummaryWriter (whose import loads TensorFlow: seconds per test file)."""

  def __init__(self, tb_dir):
    self.tb_dir = tb_dir
    self.scalars = {}
    self.closed = False
    WRITERS.append(self)

  def add_scalar(self, tag, value, step):
    self.scalars.setdefault(tag, []).append((step, value))

  def flush(self):
    pass

  def close(self):
    self.closed = True


WRITERS = []


@pytest.fixture(autouse=True)
def recording_writer(monkeypatch):
  WRITERS.clear()
  monkeypatch.setattr(run_lib, 'summary_writer', RecordingWriter)


def test_conservativity_alone_writes_t_and_conservativity(toy_workdir, caplog):
  caplog.set_level(logging.INFO)
  config = _eval_only_conservativity(configs_tiny.get_toy_config())
  run_lib.evaluate(config, toy_workdir, 'eval_c')
  eval_dir = os.path.join(toy_workdir, 'eval_c')
  with np.load(os.path.join(eval_dir, 'ckpt_1_fp_residual.npz')) as f:
    assert set(f.files) == {'t', 'conservativity'}
    np.testing.assert_allclose(f['t'], np.linspace(1e-5, 1., 3), rtol=1e-12)
    c = f['conservativity']
  assert c.shape == (3,) and np.all(np.isfinite(c))
  # A random MLP score is not a gradient field; the metric is at most 2 (an antisymmetric J).
  assert np.all(c > 1e-3) and np.all(c <= 2 + 1e-6)
  assert 'score conservativity vs t' in caplog.text and 'score-FPE residual vs t' not in caplog.text
  (writer,) = WRITERS
  assert writer.tb_dir == os.path.join(eval_dir, 'tensorboard') and writer.closed
  # At the checkpoint's training step (0: the fixture's state); the mean over t, and each t.
  assert writer.scalars['eval_conservativity'] == [(0, pytest.approx(c.mean(), rel=1e-12))]
  per_t = {tag: v for tag, v in writer.scalars.items() if tag.startswith('eval_conservativity/t=')}
  assert [v for _, ((_, v),) in sorted(per_t.items(), key=lambda kv: float(kv[0].split('=')[1]))] == \
      pytest.approx(list(c), rel=1e-12)

  # With the residual on as well: one file with both, and the same conservativity (a seed of its own).
  config.eval.enable_fp_residual = True
  run_lib.evaluate(config, toy_workdir, 'eval_both')
  with np.load(os.path.join(toy_workdir, 'eval_both', 'ckpt_1_fp_residual.npz')) as f:
    assert set(f.files) == RESIDUAL_KEYS | {'conservativity'}
    np.testing.assert_array_equal(f['conservativity'], c)
    assert f['residual'].shape == (3,)


def test_conservativity_with_probes_is_close_to_exact(toy_workdir):
  config = _eval_only_conservativity(configs_tiny.get_toy_config(), num_times=2)
  run_lib.evaluate(config, toy_workdir, 'eval_exact')
  config.eval.conservativity_num_probes = 64
  run_lib.evaluate(config, toy_workdir, 'eval_probes')
  exact, probes = (np.load(os.path.join(toy_workdir, name, 'ckpt_1_fp_residual.npz'))['conservativity']
                   for name in ('eval_exact', 'eval_probes'))
  assert np.all(np.isfinite(probes))
  # Only the first t has the same x_t in both runs: the probes are drawn from the same seeded stream as the
  # noise of the later t.
  np.testing.assert_allclose(probes[0], exact[0], rtol=0.1)


@pytest.mark.parametrize('field, value, message', [
    ('conservativity_num_probes', -1, r'config.eval.conservativity_num_probes=-1 is out of range'),
    ('conservativity_num_probes', 1.5, r'config.eval.conservativity_num_probes=1.5 must be an integer'),
    ('conservativity_num_probes', True, r'config.eval.conservativity_num_probes=True must be an integer'),
    ('enable_conservativity', 'yes', r'config.eval.enable_conservativity'),
])
def test_bad_conservativity_fields_stop_before_writing(tmp_path, field, value, message):
  config = _eval_only_conservativity(configs_tiny.get_toy_config())
  # A ConfigDict keeps a field's type; a config file built from scratch need not.
  config.eval = ml_collections.ConfigDict({**config.eval.to_dict(), field: value})
  with pytest.raises(ValueError, match=message):
    run_lib.evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_exact_jacobian_is_refused_for_images(tmp_path):
  config = _eval_only_conservativity(configs_tiny.get_config())  # 8x8x3: D = 192
  config.data.path = str(tmp_path / 'unused.npz')
  np.savez(config.data.path, train=np.zeros((4, 8, 8, 3), np.uint8), test=np.zeros((4, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r'config.eval.conservativity_num_probes=0 .*192 dimensions.*at most 64'):
    run_lib.evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_writer_closed_when_a_later_result_raises(toy_workdir, monkeypatch):
  """The eval's TensorBoard writer is released even when a checkpoint's evaluation raises after it was opened."""
  config = _eval_only_conservativity(configs_tiny.get_toy_config())
  config.eval.end_ckpt = 2
  shutil.copy(os.path.join(toy_workdir, 'checkpoints', 'checkpoint_1.pth'),
              os.path.join(toy_workdir, 'checkpoints', 'checkpoint_2.pth'))
  real = score_fpe.conservativity_vs_time
  calls = []

  def fail_on_second(*args, **kwargs):
    calls.append(None)
    if len(calls) == 2:
      raise FloatingPointError('injected')
    return real(*args, **kwargs)

  monkeypatch.setattr(score_fpe, 'conservativity_vs_time', fail_on_second)
  try:
    with pytest.raises(FloatingPointError, match='injected'):
      run_lib.evaluate(config, toy_workdir, 'eval_closed')
  finally:
    os.remove(os.path.join(toy_workdir, 'checkpoints', 'checkpoint_2.pth'))
  assert len(WRITERS) == 1 and WRITERS[0].closed
