"""End-to-end tests of run_lib.train / run_lib.evaluate on tiny configs (CPU).

The image runs use NCSN++ (nf 16) on 8x8x3 images of the NPZ dataset written to tmp_path; one run uses
`tfds.testing.mock_data` for CIFAR-10 (32x32x3); the toy runs use the 2-D demo's MLP.
"""

import logging
import os
import threading
import time

import numpy as np
import pytest
import torch

import checkpoints
import datasets
import losses
import preemption
import run_lib
import toy
import trainer as trainer_lib
import utils
from tests import configs_tiny
from tests import helpers


@pytest.fixture
def npz_config(tmp_path):
  config = configs_tiny.get_config()
  config.data.path = helpers.write_npz(tmp_path / 'data.npz')
  return config


def _step(path):
  return int(checkpoints.load_checkpoint_file(path)['step'])


def _snapshot(root):
  """Every file under root with its bytes, to check that a failed start changed nothing."""
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


def _record_train_steps(monkeypatch, record=lambda state, batch: int(state['step'])):
  """Wraps the training step; returns the list of `record(state, batch)` for every optimizer step taken."""
  calls = []
  real = trainer_lib.Trainer.train_step

  def recorded(self, state, batch):
    calls.append(record(state, batch))
    return real(self, state, batch)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_step', recorded)
  return calls


def _tensorboard_tags(tb_dir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(tb_dir)
  acc.Reload()
  return set(acc.Tags()['scalars'])


def test_train_resume_then_evaluate(npz_config, tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  workdir = str(tmp_path / 'w')
  calls = _record_train_steps(monkeypatch)
  config = npz_config  # FP regularizer on (alpha, beta > 0)
  config.training.n_iters = 2
  run_lib.train(config, workdir)
  assert calls == [0, 1]
  assert _step(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')) == 2
  assert _step(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth')) == 2  # k = step // snapshot_freq
  sample = np.load(os.path.join(workdir, 'samples', 'iter_2', 'sample.np'))
  assert sample.shape == (4, 8, 8, 3) and sample.dtype == np.uint8
  assert os.path.getsize(os.path.join(workdir, 'samples', 'iter_2', 'sample.png')) > 0
  assert 'step: 2, training_loss:' in caplog.text and 'steps/s' in caplog.text
  assert 'fp_vector' in caplog.text

  # "Kill" and resume with a longer schedule: it continues from step 2, not 0.
  calls.clear()
  config.training.n_iters = 3
  run_lib.train(config, workdir)
  assert calls == [2]
  assert 'Resuming from' in caplog.text and 'at step 2' in caplog.text
  assert _step(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')) == 3
  # The final step saves checkpoint_{3 // 2}, overwriting step 2's (as Score SDE).
  assert _step(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth')) == 3
  assert os.path.exists(os.path.join(workdir, 'samples', 'iter_3', 'sample.png'))  # the final step's
  tags = _tensorboard_tags(os.path.join(workdir, 'tensorboard'))
  assert {'training_loss', 'dsm', 'fp_vector', 'fp_scalar', 'eval_loss', 'eval_fp_vector'} <= tags

  # Resuming at n_iters: says so, trains nothing, writes nothing.
  calls.clear()
  before = _snapshot(workdir)
  run_lib.train(config, workdir)
  assert calls == []
  assert 'nothing to train' in caplog.text
  assert _snapshot(workdir) == before

  # Evaluate checkpoint 1: loss with the FP terms, bits/dim, the score-FPE residual vs t.
  config.eval.end_ckpt = 1
  run_lib.evaluate(config, workdir, 'eval_test')
  eval_dir = os.path.join(workdir, 'eval_test')
  with np.load(os.path.join(eval_dir, 'ckpt_1_loss.npz')) as f:
    assert f['all_losses'].shape == (1,)  # 4 test images in one batch of 4
    np.testing.assert_allclose(f['mean_loss'], f['all_losses'].mean())
    for name in ('dsm', 'fp_vector', 'fp_scalar'):
      assert f[f'all_{name}'].shape == (1,) and np.all(np.isfinite(f[f'all_{name}']))
    # loss = dsm + alpha fp_vector + beta fp_scalar
    np.testing.assert_allclose(f['all_losses'], f['all_dsm'] + 0.01 * f['all_fp_vector'] +
                               0.001 * f['all_fp_scalar'], rtol=1e-5)
  with np.load(os.path.join(eval_dir, 'test_ckpt_1_bpd_0.npz')) as f:
    assert f['arr_0'].shape == (4,)
    np.testing.assert_array_equal(f['all_bpds'], f['arr_0'])
    assert np.all(np.isfinite(f['arr_0'])) and np.all(f['arr_0'] > 0)
  assert not os.path.exists(os.path.join(eval_dir, 'test_ckpt_1_bpd_1.npz'))
  with np.load(os.path.join(eval_dir, 'ckpt_1_fp_residual.npz')) as f:
    np.testing.assert_allclose(f['t'], [1e-5, 1.], rtol=1e-12)
    for name in ('residual', 'residual_weighted', 'scalar', 'time_derivative'):
      assert f[name].shape == (2,) and np.all(np.isfinite(f[name])) and np.all(f[name] >= 0)
  assert 'score-FPE residual vs t' in caplog.text


def test_eval_loss_matches_the_eval_step_on_the_ema_weights(tmp_path):
  """The saved eval loss is exactly the eval step's loss on the checkpoint's EMA weights, with evaluate's seed."""
  config = configs_tiny.get_config()
  # Identical test images: the eval split's shuffle cannot change which noise meets which image.
  image = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
  np.savez(tmp_path / 'same.npz', train=np.repeat(image, 8, axis=0), test=np.repeat(image, 8, axis=0))
  config.data.path = str(tmp_path / 'same.npz')
  workdir = str(tmp_path / 'w')
  config.training.n_iters = 2
  config.training.snapshot_sampling = False
  config.training.alpha = config.training.beta = 0.  # DSM alone: Score SDE's loss file
  run_lib.train(config, workdir)
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  config.eval.enable_bpd = config.eval.enable_fp_residual = False
  run_lib.evaluate(config, workdir)
  with np.load(os.path.join(workdir, 'eval', 'ckpt_1_loss.npz')) as f:
    assert set(f.files) == {'all_losses', 'mean_loss'}
    saved = f['all_losses']
  assert saved.shape == (2,)

  import sde_lib
  state = run_lib.build_state(config)
  state = utils.restore_checkpoint(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth'), state, 'cpu')
  ema_weights = [p.clone() for p in state['ema'].shadow_params]
  sde = sde_lib.sde_from_config(config)
  step_fn = losses.step_fn_from_config(config, sde, train=False, optimize_fn=losses.optimization_manager(config))
  # Each batch's noise comes from its own seed (evaluate's `_seeded`), whatever the order of evaluation.
  expected = []
  for index, batch in datasets.get_data(config).eval_batches('test'):
    torch.manual_seed(utils.seed_for(config.seed, 'eval_loss', index))
    expected.append(step_fn(state, batch).item())
  np.testing.assert_allclose(saved, expected, rtol=1e-6)
  # ... and the EMA weights differ from the raw weights, so using the wrong ones would show.
  assert any(not torch.equal(e, p) for e, p in zip(ema_weights, state['model'].parameters()))


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(npz_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'w')
  real = trainer_lib.Trainer.train_step

  def poisoned(self, state, batch):
    terms = real(self, state, batch)
    if state['step'] == 3:  # the 3rd update diverges: weights and loss become NaN
      with torch.no_grad():
        for p in state['model'].parameters():
          p.fill_(float('nan'))
      terms = dict(terms, loss=terms['loss'] * float('nan'))
    return terms

  monkeypatch.setattr(trainer_lib.Trainer, 'train_step', poisoned)
  config = npz_config
  config.training.n_iters = 6
  config.training.log_freq = 4  # the check before the step-3 preemption checkpoint must catch it
  config.training.snapshot_sampling = False
  config.training.alpha = config.training.beta = 0.
  with pytest.raises(FloatingPointError, match='step 3'):
    run_lib.train(config, workdir)
  meta = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
  assert _step(meta) == 2
  assert _step(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth')) == 2
  weights = checkpoints.load_checkpoint_file(meta)['model']
  assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize('field, value, message', [
    ('training.sde', 'vesdee', 'config.training.sde'),
    ('training.fp_wgt_type', 'lol', 'config.training.fp_wgt_type'),
    ('sampling.predictor', 'nope', 'config.sampling.predictor'),
    ('data.dataset', 'NOPE', 'config.data.dataset'),
    ('data.num_channels', 1, 'num_channels'),
    ('training.snapshot_freq', 0, 'config.training.snapshot_freq'),
])
def test_bad_config_stops_before_writing(npz_config, tmp_path, field, value, message):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  section, name = field.split('.')
  setattr(getattr(npz_config, section), name, value)
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=message):
    run_lib.train(npz_config, str(workdir))
  assert _snapshot(workdir) == before
  assert sorted(os.listdir(workdir)) == ['notes.txt']


def test_fp_residual_of_a_discrete_model_stops_before_writing(npz_config, tmp_path, monkeypatch):
  # Bounded, so that without the check the test fails on the missing checkpoint instead of waiting forever.
  monkeypatch.setattr(checkpoints, 'CHECKPOINT_WAIT_LIMIT_SECONDS', 0.1)
  npz_config.training.continuous = False
  npz_config.model.embedding_type = 'positional'
  npz_config.training.alpha = npz_config.training.beta = 0.
  npz_config.eval.enable_fp_residual = True
  with pytest.raises(ValueError, match='eval.enable_fp_residual=True needs a continuous-time model'):
    run_lib.evaluate(npz_config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_checkpoint_that_does_not_fit_stops_before_training(npz_config, tmp_path):
  workdir = tmp_path / 'w'
  other = configs_tiny.get_config()
  other.model.nf = 16  # another network: its weights do not fit the config's model
  meta = workdir / 'checkpoints-meta' / 'checkpoint.pth'
  meta.parent.mkdir(parents=True)
  utils.save_checkpoint(str(meta), run_lib.build_state(other))
  before = _snapshot(workdir)
  with pytest.raises(checkpoints.CheckpointError, match='does not fit the model'):
    run_lib.train(npz_config, str(workdir))
  assert _snapshot(workdir) == before
  assert sorted(os.listdir(workdir)) == ['checkpoints-meta']


def test_wait_for_checkpoint_logs_and_is_bounded(tmp_path, caplog):
  path = str(tmp_path / 'checkpoint_1.pth')
  start = time.time()
  with pytest.raises(TimeoutError, match='checkpoint_1.pth'):
    checkpoints.wait_for_checkpoint(path, poll_seconds=0.05, limit_seconds=0.2)
  assert 0.2 <= time.time() - start < 5
  assert 'Waiting for' in caplog.text and 'training has not written it yet' in caplog.text

  timer = threading.Timer(0.2, lambda: open(path, 'wb').close())
  timer.start()
  checkpoints.wait_for_checkpoint(path, poll_seconds=0.05, limit_seconds=10)
  timer.join()
  assert os.path.exists(path)


def test_evaluate_waits_for_a_live_trainer_at_most_wait_limit_seconds(npz_config, tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints, 'CHECKPOINT_POLL_SECONDS', 0.05)
  workdir = str(tmp_path / 'w')
  lock = preemption.WorkdirLock(workdir).acquire()  # this process holds it: a live trainer
  try:
    npz_config.eval.wait_limit_seconds = 0.3
    with pytest.raises(TimeoutError, match=r'checkpoint_1.pth did not appear within 0.3 s '
                                           r'\(eval.wait_limit_seconds\).*is held by PID'):
      run_lib.evaluate(npz_config, workdir)
  finally:
    lock.release()


def test_toy_train_and_evaluate_with_sample_quality(tmp_path):
  workdir = str(tmp_path / 'w')
  config = configs_tiny.get_toy_config()
  config.training.n_iters = 2
  run_lib.train(config, workdir)
  points = np.load(os.path.join(workdir, 'samples', 'iter_2', 'sample.np'))
  assert points.shape == (4, 2) and points.dtype == np.float32
  assert os.path.getsize(os.path.join(workdir, 'samples', 'iter_2', 'sample.png')) > 0

  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  run_lib.evaluate(config, workdir)
  eval_dir = os.path.join(workdir, 'eval')
  samples = [np.load(os.path.join(eval_dir, 'ckpt_1', f'samples_{r}.npz'))['samples'] for r in (0, 1)]
  assert not os.path.exists(os.path.join(eval_dir, 'ckpt_1', 'samples_2.npz'))
  samples = np.concatenate(samples)[:6]
  expected = toy.sample_quality(samples, config)
  with np.load(os.path.join(eval_dir, 'report_1.npz')) as report:
    assert set(report.files) == {'swd', 'mmd'}
    for name, value in expected.items():
      np.testing.assert_allclose(report[name], value, rtol=1e-12)
  # Continuous data: no dequantization, bits/dim of the density itself (may be negative, must be finite).
  # Score SDE's round ids: batch + num_batches * repeat, for 2 batches and eval.bpd_num_repeats = 2.
  bpds = []
  for round_id in range(4):
    with np.load(os.path.join(eval_dir, f'test_ckpt_1_bpd_{round_id}.npz')) as f:
      assert f['arr_0'].shape == (4,) and np.all(np.isfinite(f['arr_0']))
      bpds.extend(f['arr_0'])
      np.testing.assert_array_equal(f['all_bpds'], np.asarray(bpds))
  assert not os.path.exists(os.path.join(eval_dir, 'test_ckpt_1_bpd_4.npz'))
  # The same test set in both repeats, with exact traces (the toy config): the same bits/dim.
  np.testing.assert_allclose(bpds[8:], bpds[:8], rtol=1e-6)
  assert os.path.exists(os.path.join(eval_dir, 'ckpt_1_fp_residual.npz'))


def test_resumed_toy_run_continues_the_data_stream(tmp_path, monkeypatch):
  seen = _record_train_steps(monkeypatch, lambda state, batch: batch.reshape(batch.shape[0], -1).cpu().numpy())
  config = configs_tiny.get_toy_config()
  config.training.snapshot_sampling = False
  config.training.n_iters = 2
  workdir = str(tmp_path / 'w')
  run_lib.train(config, workdir)
  config.training.n_iters = 4
  run_lib.train(config, workdir)  # resumes at step 2
  stream = iter(toy.get_toy_datasets(config)[0])
  expected = [next(stream)['image'].reshape(-1, 2) for _ in range(4)]
  # An uninterrupted run's batches 0..3: the resumed run neither replays batches 0, 1 nor skips any.
  assert len(seen) == 4
  for got, want in zip(seen, expected):
    np.testing.assert_array_equal(got, want)


def test_cifar10_mock_data_trains(tmp_path):
  import tensorflow_datasets as tfds
  config = configs_tiny.get_config()
  config.data.dataset = 'CIFAR10'
  config.data.image_size = 32
  config.training.batch_size = 2
  config.training.n_iters = 1
  config.training.eval_freq = 1
  config.training.snapshot_sampling = False
  config.model.attn_resolutions = (16,)
  config.training.alpha = config.training.beta = 0.
  workdir = str(tmp_path / 'w')
  with tfds.testing.mock_data(num_examples=4):
    run_lib.train(config, workdir)
  assert _step(os.path.join(workdir, 'checkpoints', 'checkpoint_0.pth')) == 1


def test_image_samples_fid_stats_and_report(npz_config, tmp_path):
  import evaluation
  import main
  workdir = str(tmp_path / 'w')
  config = npz_config
  config.training.n_iters = 1
  config.training.alpha = config.training.beta = 0.
  config.training.snapshot_sampling = False
  run_lib.train(config, workdir)

  config.eval.inception_model = helpers.save_tiny_inception(str(tmp_path / 'inception'))
  main.compute_fid_stats(config)  # --mode fid_stats: the stats file beside the NPZ data
  with np.load(str(tmp_path / 'data_stats.npz')) as f:
    data_pools = f['pool_3']
  assert data_pools.shape == (16, 4)

  config.eval.begin_ckpt = config.eval.end_ckpt = 0
  config.eval.enable_loss = config.eval.enable_bpd = config.eval.enable_fp_residual = False
  config.eval.enable_sampling = True
  config.eval.num_samples = 6  # two rounds of 4, truncated to 6
  run_lib.evaluate(config, workdir)
  sample_dir = os.path.join(workdir, 'eval', 'ckpt_0')
  assert sorted(os.listdir(sample_dir)) == ['samples_0.npz', 'samples_1.npz', 'statistics_0.npz',
                                            'statistics_1.npz']
  model = evaluation.get_inception_model(config=config)
  pools, logits = [], []
  for r in (0, 1):
    samples = np.load(os.path.join(sample_dir, f'samples_{r}.npz'))['samples']
    assert samples.shape == (4, 8, 8, 3) and samples.dtype == np.uint8
    stats = np.load(os.path.join(sample_dir, f'statistics_{r}.npz'))
    expected = evaluation.run_inception_distributed(samples, model)
    np.testing.assert_allclose(stats['pool_3'], expected['pool_3'], rtol=1e-6)
    pools.append(stats['pool_3'])
    logits.append(stats['logits'])
  expected = evaluation.sample_quality_metrics(data_pools, np.concatenate(pools)[:6], np.concatenate(logits)[:6])
  with np.load(os.path.join(workdir, 'eval', 'report_0.npz')) as report:
    assert set(report.files) == {'IS', 'fid', 'kid'}
    np.testing.assert_allclose(report['IS'], expected['is'], rtol=1e-6)
    np.testing.assert_allclose(report['fid'], expected['fid'], rtol=1e-6)
    np.testing.assert_allclose(report['kid'], expected['kid'], rtol=1e-6)


def test_progress_names_its_unit_and_what_the_eta_assumes():
  progress = utils.Progress(10, 'bits/dim', unit='batch', show_bar=False, eta_basis='at the rate so far')
  text = progress.status(5)
  assert '5/10 batches' in text and 'batches/s' in text and 'batchs' not in text
  assert text.endswith('(at the rate so far)')


def test_an_empty_eval_range_says_where_checkpoints_come_from(tmp_path):
  config = configs_tiny.get_toy_config()
  config.eval.begin_ckpt, config.eval.end_ckpt = 5, 3
  with pytest.raises(ValueError, match=r'config.eval.end_ckpt=3 is smaller than config.eval.begin_ckpt=5.*'
                                       r'training.snapshot_freq.*training.n_iters.*--config.eval.begin_ckpt'):
    run_lib.evaluate(config, str(tmp_path))


def test_regularizer_without_a_checkpoint_warns(tmp_path, caplog):
  config = configs_tiny.get_toy_config()
  assert config.training.alpha > 0
  with caplog.at_level(logging.WARNING):
    run_lib.setup_training(config, str(tmp_path / 'w'))
  assert 'but there is no checkpoint at' in caplog.text and 'not fine-tuning' in caplog.text


def test_skipped_checkpoint_warning_does_not_advise_the_setting_in_force(tmp_path, caplog):
  config = configs_tiny.get_toy_config()
  config.training.n_iters, config.training.snapshot_freq = 2, 2
  workdir = str(tmp_path / 'w')
  run_lib.train(config, workdir)  # checkpoint_1 only
  config.eval.begin_ckpt, config.eval.end_ckpt, config.eval.skip_missing_ckpts = 0, 1, True
  config.eval.enable_bpd = config.eval.enable_sampling = False
  config.eval.enable_fp_residual = config.eval.enable_conservativity = False
  with caplog.at_level(logging.WARNING):
    run_lib.evaluate(config, workdir)
  assert 'Skipping checkpoint' in caplog.text and 'no trainer will write it' in caplog.text
  assert 'set eval.skip_missing_ckpts=True' not in caplog.text


def test_await_checkpoint_asks_the_ranks_once_per_poll_interval(tmp_path, monkeypatch):
  """Under torchrun the other ranks wait in a broadcast while rank 0 polls: each broadcast must cover one poll
  interval, not the whole wait, or a long wait would exceed training.dist_timeout_seconds."""
  monkeypatch.setattr(checkpoints, 'CHECKPOINT_POLL_SECONDS', 0.05)
  monkeypatch.setattr(preemption, 'trainer_status', lambda workdir: (True, 'a trainer runs'))
  verdicts = []
  real = checkpoints.distributed.broadcast_object
  monkeypatch.setattr(checkpoints.distributed, 'broadcast_object', lambda obj: verdicts.append(obj) or real(obj))
  path = tmp_path / 'checkpoints' / 'checkpoint_1.pth'
  threading.Timer(0.4, lambda: (path.parent.mkdir(), path.write_bytes(b'x'))).start()
  assert checkpoints.await_checkpoint(str(path), str(tmp_path), 10., skip_missing=False)
  assert verdicts[-1] is True and verdicts.count(None) >= 3
  with pytest.raises(TimeoutError, match=r'checkpoint_2.pth did not appear within 0.2 s \(eval.wait_limit_seconds\)'):
    checkpoints.await_checkpoint(str(tmp_path / 'checkpoints' / 'checkpoint_2.pth'), str(tmp_path), 0.2, False)
