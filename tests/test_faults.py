"""How runs survive how real jobs die: kills at the worst moment, SIGTERM / SIGINT, a second trainer, stale locks,
exploding or NaN weights, evaluation with nothing to wait for, batches larger than the data.

Where a signal or a second process is involved, the trainer is a real subprocess (main.py, or
tests/fault_worker.py where a fault must hit an exact moment); the rest runs in this process. The runs use the
tiny 2-D config of tests/configs_tiny.py; bench/fault_matrix.py runs the wider matrix.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoints
import preemption
import run_lib
import trainer as trainer_lib
import utils
from tests import configs_tiny
from tests import torchrun_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The toy config, made quick and quiet: no snapshot sampling, an eval step rarely.
QUICK = {'training.snapshot_sampling': False, 'training.eval_freq': 1000, 'training.log_freq': 1,
         'training.snapshot_freq': 2, 'training.snapshot_freq_for_preemption': 1, 'optim.warmup': 0}


def _config(**overrides):
  return torchrun_worker.config_with(dict(QUICK, **{k.replace('__', '.'): v for k, v in overrides.items()}))


def _step(path):
  return int(checkpoints.load_checkpoint_file(path)['step'])


def _env():
  return dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2', OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def _wait_for(predicate, what, timeout=240):
  start = time.time()
  while not predicate():
    if time.time() - start > timeout:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.2)


def _log_has(workdir, text):
  path = os.path.join(workdir, 'stdout.txt')
  return os.path.exists(path) and text in open(path).read()


def _eval_config(config, begin, end, **kw):
  config.eval.begin_ckpt, config.eval.end_ckpt = begin, end
  config.eval.enable_bpd = config.eval.enable_sampling = config.eval.enable_fp_residual = False
  for name, value in kw.items():
    setattr(config.eval, name, value)
  return config


# ----------------------------------------------------------------------------------------------------------
# Subprocesses: real signals, a real second process
# ----------------------------------------------------------------------------------------------------------


def test_sigterm_saves_and_exits_75_while_the_lock_refuses_a_second_trainer_and_guides_eval(tmp_path):
  workdir = str(tmp_path / 'w')
  flags = [f'--config.{k}={v}' for k, v in dict(QUICK, **{
      'training.n_iters': 10 ** 6, 'training.snapshot_freq': 10 ** 6,
      'training.snapshot_freq_for_preemption': 10 ** 6, 'training.log_freq': 5}).items()]
  trainer = subprocess.Popen(
      [sys.executable, 'main.py', f'--config={ROOT}/tests/configs_tiny.py:toy', f'--workdir={workdir}',
       '--mode=train', *flags], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: _log_has(workdir, 'step: 10, training_loss'), 'training to run')
    lock = preemption.read_holder(os.path.join(workdir, preemption.LOCK_NAME))
    assert lock.pid == trainer.pid and lock.host == socket.gethostname() and lock.alive()

    # A second trainer on the same workdir is refused, naming the first.
    config = _config(training__n_iters=10 ** 6)
    with pytest.raises(preemption.WorkdirLocked, match=f'Another trainer runs on this workdir: .* held by PID '
                                                       f'{trainer.pid} on host'):
      run_lib.train(config, workdir)
    # Evaluation waits for a checkpoint while the trainer runs, within eval.wait_limit_seconds.
    with pytest.raises(TimeoutError, match=f'checkpoint_1.pth did not appear.*held by PID {trainer.pid}'):
      run_lib.evaluate(_eval_config(_config(), 1, 1, wait_limit_seconds=0.5), workdir)

    trainer.send_signal(signal.SIGTERM)
    _, stderr = trainer.communicate(timeout=120)
  finally:
    if trainer.poll() is None:
      trainer.kill()
  assert trainer.returncode == preemption.EXIT_STOPPED == 75, stderr[-3000:]
  assert 'Traceback' not in stderr
  log = open(os.path.join(workdir, 'stdout.txt')).read()
  line = next(line for line in log.splitlines() if 'Stopped by SIGTERM at step' in line)
  step = int(line.split('Stopped by SIGTERM at step ')[1].split(':')[0])
  assert step >= 10 and 'saved the resume point' in line and 'Run the same command to resume' in line
  assert _step(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')) == step
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))

  # No trainer any more: evaluation stops at once on the missing checkpoint, naming it.
  start = time.time()
  with pytest.raises(checkpoints.MissingCheckpointError, match='checkpoint_1.pth does not exist, and no trainer will '
                                                           'write it: no trainer holds'):
    run_lib.evaluate(_eval_config(_config(), 1, 1), workdir)
  assert time.time() - start < 60


def test_sigkill_in_the_middle_of_saving_the_resume_point_loses_no_snapshot(tmp_path, caplog):
  """The worst moment: the snapshot of step 4 is written, the resume point of step 4 is half written."""
  workdir = str(tmp_path / 'w')
  overrides = dict(QUICK, **{'training.n_iters': 8})
  result = subprocess.run([sys.executable, 'tests/fault_worker.py', workdir, json.dumps(overrides),
                           '--kill_during_meta_save', '4'], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  meta_dir = os.path.join(workdir, 'checkpoints-meta')
  leftovers = [name for name in os.listdir(meta_dir) if name.endswith('.tmp')]
  assert len(leftovers) == 1  # the killed save's temporary file
  assert _step(os.path.join(meta_dir, 'checkpoint.pth')) == 3
  assert _step(os.path.join(workdir, 'checkpoints', 'checkpoint_2.pth')) == 4  # written before the resume point
  assert os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))  # a dead process's lock

  caplog.set_level(logging.INFO)
  run_lib.train(_config(training__n_iters=8), workdir)
  assert 'Took over the stale workdir lock' in caplog.text
  assert 'Removed 1 temporary file(s) left by a write that was killed' in caplog.text
  assert os.listdir(meta_dir) == ['checkpoint.pth']
  assert [_step(os.path.join(workdir, 'checkpoints', f'checkpoint_{k}.pth')) for k in range(1, 5)] == [2, 4, 6, 8]
  assert _step(os.path.join(meta_dir, 'checkpoint.pth')) == 8
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))


def test_a_second_sigint_exits_at_once_without_saving(tmp_path):
  workdir = str(tmp_path / 'w')
  overrides = dict(QUICK, **{'training.n_iters': 10 ** 6, 'training.snapshot_freq': 10 ** 6,
                             'training.snapshot_freq_for_preemption': 10 ** 6, 'training.log_freq': 5})
  worker = subprocess.Popen([sys.executable, 'tests/fault_worker.py', workdir, json.dumps(overrides),
                             '--slow_stop_save', '30'], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: _log_has(workdir, 'step: 10, training_loss'), 'training to run')
    worker.send_signal(signal.SIGINT)
    _wait_for(lambda: _log_has(workdir, 'fault_worker: stopping on a signal'), 'the stop to begin', timeout=60)
    time.sleep(1.5)  # a second signal, not the same one delivered twice
    worker.send_signal(signal.SIGINT)
    _, stderr = worker.communicate(timeout=20)  # at once: not after the 30 s save
  finally:
    if worker.poll() is None:
      worker.kill()
  assert worker.returncode == 128 + signal.SIGINT, stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth'))  # nothing saved
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))  # released on the way out


def _main_cmd(workdir, mode, overrides, *extra, script='main.py'):
  return [sys.executable, script, f'--config={ROOT}/tests/configs_tiny.py:toy', f'--workdir={workdir}',
          f'--mode={mode}', *[f'--config.{k}={v}' for k, v in overrides.items()], *extra]


def _stop_with(workdir, signum, ignore_sighup=False):
  """Trains without end in main.py, sends `signum` at step 5 or later; returns (the process, its stderr)."""
  overrides = dict(QUICK, **{'training.n_iters': 10 ** 6, 'training.snapshot_freq': 10 ** 6,
                             'training.snapshot_freq_for_preemption': 10 ** 6, 'training.log_freq': 5})
  # As nohup starts a command: SIGHUP ignored, which the child inherits across exec. Otherwise its default, set
  # explicitly: a suite itself started under nohup would pass SIG_IGN down and the plain case could not stop.
  disposition = signal.SIG_IGN if ignore_sighup else signal.SIG_DFL
  preexec = lambda: signal.signal(signal.SIGHUP, disposition)  # pylint: disable=unnecessary-lambda-assignment
  trainer = subprocess.Popen(_main_cmd(workdir, 'train', overrides), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
  try:
    _wait_for(lambda: _log_has(workdir, 'step: 5, training_loss'), 'training to run')
    trainer.send_signal(signum)
    if ignore_sighup:
      log_size = os.path.getsize(os.path.join(workdir, 'stdout.txt'))
      _wait_for(lambda: os.path.getsize(os.path.join(workdir, 'stdout.txt')) > log_size + 500, 'training to go on')
      assert trainer.poll() is None
      trainer.send_signal(signal.SIGTERM)
    _, stderr = trainer.communicate(timeout=120)
  finally:
    if trainer.poll() is None:
      trainer.kill()
  return trainer, stderr


def test_sighup_stops_like_sigterm_unless_started_under_nohup(tmp_path):
  # Under nohup, a closed terminal does not stop the run: SIGHUP stays ignored (SIGTERM stops it here).
  workdir = str(tmp_path / 'nohup')
  trainer, stderr = _stop_with(workdir, signal.SIGHUP, ignore_sighup=True)
  assert trainer.returncode == preemption.EXIT_STOPPED, stderr[-3000:]
  assert 'Stopped by SIGTERM' in open(os.path.join(workdir, 'stdout.txt')).read()

  # Otherwise SIGHUP (a closed terminal, a dropped ssh session) saves the resume point at the step boundary.
  workdir = str(tmp_path / 'w')
  meta = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
  trainer, stderr = _stop_with(workdir, signal.SIGHUP)
  assert trainer.returncode == preemption.EXIT_STOPPED == 75, stderr[-3000:]
  assert 'Traceback' not in stderr
  line = next(line for line in open(os.path.join(workdir, 'stdout.txt')).read().splitlines()
              if 'Stopped by SIGHUP at step' in line)
  step = int(line.split('Stopped by SIGHUP at step ')[1].split(':')[0])
  assert step >= 5 and 'saved the resume point' in line and _step(meta) == step
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))


def test_a_full_disk_is_one_error_line_naming_the_file_and_keeps_the_resume_point(tmp_path):
  workdir = str(tmp_path / 'w')
  meta = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
  run_lib.train(_config(training__n_iters=4), workdir)
  # Training on: the resume point of step 5 (72 KB) hits the full disk in the middle of torch.save.
  env = dict(_env(), FULL_DISK_BYTES='20000')
  result = subprocess.run(_main_cmd(workdir, 'train', dict(QUICK, **{'training.n_iters': 8}),
                                    script='tests/full_disk.py'), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if 'failed:' in line]
  assert len(errors) == 1 and (f'train failed: WriteError: Cannot write checkpoint {meta}: [Errno 28] No space left '
                              'on device (traceback in') in errors[0], errors
  assert 'Traceback' not in result.stderr and 'unexpected pos' not in result.stderr
  assert _step(meta) == 4 and os.listdir(os.path.dirname(meta)) == ['checkpoint.pth']

  # Evaluation: its first result file.
  env['FULL_DISK_BYTES'] = '0'
  result = subprocess.run(_main_cmd(workdir, 'eval', dict(QUICK, **{
      'eval.begin_ckpt': 1, 'eval.end_ckpt': 1, 'eval.enable_bpd': False, 'eval.enable_sampling': False,
      'eval.enable_fp_residual': False}), script='tests/full_disk.py'), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  loss_file = os.path.join(workdir, 'eval', 'ckpt_1_loss.npz')
  errors = [line for line in result.stderr.splitlines() if 'failed:' in line]
  assert len(errors) == 1 and f'eval failed: WriteError: Cannot write {loss_file}: [Errno 28] No space left on ' \
                              'device' in errors[0], errors
  assert 'Traceback' not in result.stderr and 'Exception ignored' not in result.stderr
  assert os.listdir(os.path.join(workdir, 'eval')) == []


def test_an_eval_folder_outside_the_workdir_is_refused_unless_allowed(tmp_path):
  workdir = str(tmp_path / 'w')
  run_lib.train(_config(training__n_iters=2, training__snapshot_freq=2), workdir)
  before = sorted(os.listdir(tmp_path))
  (tmp_path / 'w' / 'link').symlink_to(tmp_path / 'elsewhere')
  for folder in (str(tmp_path / 'outside'), '../outside', 'eval/../../outside', 'link/eval'):
    with pytest.raises(ValueError, match=rf"^--eval_folder={re.escape(repr(folder))} resolves to .*, outside the "
                                         r'workdir .*Pass --allow_outside_workdir'):
      run_lib.evaluate(_eval_config(_config(), 1, 1), workdir, folder)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created
  # Inside, however spelled, or outside when asked explicitly.
  run_lib.evaluate(_eval_config(_config(), 1, 1), workdir, os.path.join(workdir, 'sub', '..', 'abs'))
  run_lib.evaluate(_eval_config(_config(), 1, 1), workdir, '../outside', allow_outside_workdir=True)
  assert os.listdir(tmp_path / 'w' / 'abs') == os.listdir(tmp_path / 'outside') == ['ckpt_1_loss.npz']

  # main.py: one line naming the flag, before anything runs.
  result = subprocess.run(_main_cmd(workdir, 'eval', {}, '--eval_folder=/etc'), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "eval failed: ValueError: --eval_folder='/etc' resolves to /etc" in result.stderr


def test_a_lock_that_links_to_nothing_is_taken_over_and_a_fifo_is_refused(tmp_path, caplog):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  lock_path = workdir / preemption.LOCK_NAME
  lock_path.symlink_to(tmp_path / 'gone')
  with caplog.at_level(logging.WARNING):
    lock = preemption.WorkdirLock(str(workdir)).acquire()
  assert f"Took over the workdir lock {lock_path}, a symbolic link to '{tmp_path / 'gone'}', which does not exist" \
         in caplog.text
  assert not lock_path.is_symlink() and preemption.read_holder(str(lock_path)).pid == os.getpid()
  lock.release()

  # A FIFO as the lock: refused at once (opening it for reading would wait for a writer forever).
  os.mkfifo(lock_path)
  start = time.time()
  with pytest.raises(preemption.WorkdirLocked, match='exists but it is not a regular file'):
    preemption.WorkdirLock(str(workdir)).acquire()
  assert time.time() - start < 10


# ----------------------------------------------------------------------------------------------------------
# In this process
# ----------------------------------------------------------------------------------------------------------


def test_resume_writes_the_snapshot_an_earlier_version_lost(tmp_path, caplog):
  """Before the fix, a kill between the resume point and the snapshot of step k resumed past k without it."""
  workdir = str(tmp_path / 'w')
  run_lib.train(_config(training__n_iters=4), workdir)
  lost = os.path.join(workdir, 'checkpoints', 'checkpoint_2.pth')
  os.remove(lost)
  caplog.set_level(logging.WARNING)
  run_lib.train(_config(training__n_iters=6), workdir)
  assert 'checkpoint_2.pth due at step 4 is missing' in caplog.text
  assert [_step(os.path.join(workdir, 'checkpoints', f'checkpoint_{k}.pth')) for k in (1, 2, 3)] == [2, 4, 6]


def _dead_pid():
  child = subprocess.Popen(['true'])
  child.wait()
  return child.pid


def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  record = dict({'host': socket.gethostname(), 'token': 'x' * 32, 'since': 'earlier', 'command': 'main.py'},
                **record)
  with open(os.path.join(workdir, preemption.LOCK_NAME), 'w') as f:
    json.dump(record, f)


def test_lock_from_another_host_is_taken_over_only_from_an_earlier_attempt_of_the_same_torchrun_run(
    tmp_path, caplog):
  workdir = str(tmp_path / 'w')
  path = os.path.join(workdir, preemption.LOCK_NAME)
  ours = ('job-17', 'attempt-b')
  # Refused: no run recorded (a plain run, or an older version), another run, the same attempt, or we are not
  # under torchrun's agent.
  for record, elastic in (({}, ours), ({'elastic_run': 'job-16', 'elastic_attempt': 'attempt-a'}, ours),
                          ({'elastic_run': 'job-17', 'elastic_attempt': 'attempt-b'}, ours),
                          ({'elastic_run': 'job-17', 'elastic_attempt': 'attempt-a'}, None)):
    _write_lock(workdir, pid=1, host='node3', **record)
    with pytest.raises(preemption.WorkdirLocked, match=r'host node3, .*another machine'):
      preemption.WorkdirLock(workdir, elastic=elastic).acquire()
    assert preemption.read_holder(path).host == 'node3'
  # An earlier attempt of this run, whose rank 0 ran on node3: torchrun stopped it before starting ours.
  _write_lock(workdir, pid=1, host='node3', elastic_run='job-17', elastic_attempt='attempt-a')
  with caplog.at_level(logging.WARNING):
    lock = preemption.WorkdirLock(workdir, elastic=ours).acquire()
  assert 'an earlier attempt of this torchrun run (TORCHELASTIC_RUN_ID=job-17)' in caplog.text
  holder = preemption.read_holder(path)
  assert (holder.pid, holder.elastic_run, holder.elastic_attempt) == (os.getpid(), 'job-17', 'attempt-b')
  lock.release()


def test_elastic_attempt_is_the_run_id_and_the_attempt_every_rank_shares(monkeypatch):
  import distributed
  monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
  assert distributed.elastic_attempt() is None
  monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job-17')
  assert distributed.elastic_attempt() is None  # not joined through the agent's store: no attempt id
  monkeypatch.setattr(distributed, '_CONTEXT', distributed.Context(rank=0, world_size=2, attempt='a1'))
  assert distributed.elastic_attempt() == ('job-17', 'a1')


def test_workdir_lock_takes_over_dead_holders_and_refuses_live_remote_or_unreadable_ones(tmp_path, caplog):
  workdir = str(tmp_path / 'w')
  path = os.path.join(workdir, preemption.LOCK_NAME)
  # A dead process, and a live PID that now belongs to a newer process (its start time differs): both stale.
  for record in ({'pid': _dead_pid()}, {'pid': os.getpid(), 'start_time': 1}):
    _write_lock(workdir, **record)
    with caplog.at_level(logging.WARNING):
      lock = preemption.WorkdirLock(workdir).acquire()
    assert 'Took over the stale workdir lock' in caplog.text and f'PID {record["pid"]} on host' in caplog.text
    assert preemption.read_holder(path).pid == os.getpid()
    lock.release()
    assert not os.path.exists(path)
    caplog.clear()

  # Live on this host (this very process), on another host, unreadable: refused, the file left as it was.
  live = preemption.WorkdirLock(workdir).acquire()
  with pytest.raises(preemption.WorkdirLocked, match=f'held by PID {os.getpid()} on host'):
    preemption.WorkdirLock(workdir).acquire()
  assert preemption.trainer_status(workdir)[0] is True
  live.release()
  _write_lock(workdir, pid=1, host='elsewhere')
  with pytest.raises(preemption.WorkdirLocked, match="host elsewhere.*another machine.*delete the file"):
    preemption.WorkdirLock(workdir).acquire()
  assert preemption.trainer_status(workdir)[0] is None
  with open(path, 'w') as f:
    f.write('not json')
  with pytest.raises(preemption.WorkdirLocked, match='exists but it is not a lock record'):
    preemption.WorkdirLock(workdir).acquire()
  assert open(path).read() == 'not json'

  # The trainer itself: refused before anything is built or written.
  _write_lock(workdir, pid=os.getpid(), start_time=preemption.process_start_time(os.getpid()))
  before = sorted(os.listdir(workdir))
  with pytest.raises(preemption.WorkdirLocked, match='Another trainer runs on this workdir'):
    run_lib.train(_config(), workdir)
  assert sorted(os.listdir(workdir)) == before


def _poison_step(monkeypatch, at_step, how):
  real = trainer_lib.Trainer.train_step

  def poisoned(self, state, batch):
    terms = real(self, state, batch)
    if int(state['step']) == at_step:
      with torch.no_grad():
        for p in state['model'].parameters():
          if how == 'nan':
            p.fill_(float('nan'))
          elif how == 'explode':
            p.mul_(1e6)
      if how == 'grad':
        self.last_grad_norm = torch.tensor(float('inf'))
    return terms

  monkeypatch.setattr(trainer_lib.Trainer, 'train_step', poisoned)


@pytest.mark.parametrize('how, message', [
    ('nan', 'Not saving at step 3: the parameters or their EMA are not finite'),
    ('explode', r'Not saving at step 3: the largest \|parameter\| grew to .* more than '
                r'training.max_param_growth=1000 times'),
    ('grad', 'The gradient norm is not finite .* at step 3'),
])
def test_non_finite_or_exploded_weights_never_replace_the_resume_point(tmp_path, monkeypatch, how, message):
  """The loss of step 3 is computed before its update, and is finite: the parameters are checked themselves."""
  workdir = str(tmp_path / 'w')
  _poison_step(monkeypatch, 3, how)
  config = _config(training__n_iters=6, training__log_freq=100)
  with pytest.raises(FloatingPointError, match=message) as info:
    run_lib.train(config, workdir)
  meta = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
  assert f'The last good checkpoint is {meta} (step 2)' in str(info.value)
  assert _step(meta) == 2
  weights = checkpoints.load_checkpoint_file(meta)['model']
  assert max(float(v.abs().max()) for v in weights.values() if v.is_floating_point()) < 100
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))

  # Resuming with a sane schedule works from the last good checkpoint.
  monkeypatch.undo()
  run_lib.train(_config(training__n_iters=4), workdir)
  assert _step(meta) == 4


def test_eval_stops_on_a_missing_workdir_or_checkpoint_and_can_skip(tmp_path, monkeypatch):
  missing = str(tmp_path / 'typo')
  with pytest.raises(FileNotFoundError, match=f"The workdir '{missing}' does not exist"):
    run_lib.evaluate(_eval_config(_config(), 1, 1), missing)
  assert not os.path.exists(missing)

  workdir = str(tmp_path / 'w')
  run_lib.train(_config(training__n_iters=4, training__snapshot_freq=4), workdir)  # checkpoint_1 only
  # The range has checkpoint 0, which training never wrote (no trainer runs): an error at once, naming it.
  with pytest.raises(checkpoints.MissingCheckpointError, match='checkpoint_0.pth does not exist, and no trainer'):
    run_lib.evaluate(_eval_config(_config(), 0, 1), workdir)
  assert not os.path.exists(os.path.join(workdir, 'eval', 'ckpt_1_loss.npz'))
  # ... or, with eval.skip_missing_ckpts, skipped.
  run_lib.evaluate(_eval_config(_config(), 0, 2, skip_missing_ckpts=True), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == ['ckpt_1_loss.npz']
  with pytest.raises(checkpoints.MissingCheckpointError, match='None of checkpoints 2..3 exists'):
    run_lib.evaluate(_eval_config(_config(), 2, 3, skip_missing_ckpts=True), workdir)

  # A checkpoint whose results are not finite: an error, and no result file for it.
  real = trainer_lib.Trainer.eval_step
  monkeypatch.setattr(trainer_lib.Trainer, 'eval_step',
                      lambda self, state, batch: {k: v * float('nan') for k, v in real(self, state, batch).items()})
  with pytest.raises(FloatingPointError, match='Checkpoint 1: the eval loss is not finite'):
    run_lib.evaluate(_eval_config(_config(), 1, 1), workdir, 'nan_eval')
  assert os.listdir(os.path.join(workdir, 'nan_eval')) == []


def test_a_broken_resume_point_or_checkpoint_folder_stops_before_the_first_step(tmp_path):
  workdir = tmp_path / 'w'
  meta = workdir / 'checkpoints-meta' / 'checkpoint.pth'
  meta.parent.mkdir(parents=True)
  meta.symlink_to(tmp_path / 'gone.pth')
  with pytest.raises(checkpoints.CheckpointError, match=f"Checkpoint '{meta}' is a symbolic link to .*gone.pth"):
    run_lib.train(_config(), str(workdir))
  assert meta.is_symlink()  # not replaced

  meta.unlink()
  meta.write_bytes(b'')
  with pytest.raises(checkpoints.CheckpointError, match='is empty'):
    run_lib.train(_config(), str(workdir))

  # A folder training cannot write into (here: a file where the folder should be): found before the first step.
  meta.unlink()
  meta.parent.rmdir()
  meta.parent.write_text('')
  with pytest.raises(OSError, match='checkpoints-meta.*the resume point'):
    run_lib.train(_config(), str(workdir))
  assert not (workdir / 'checkpoints' / 'checkpoint_1.pth').exists()


def test_batches_larger_than_the_split_are_refused(tmp_path):
  rng = np.random.default_rng(0)
  data = str(tmp_path / 'data.npz')
  np.savez(data, train=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
  config = configs_tiny.get_config()
  config.data.path = data
  config.training.batch_size = 32
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=r'config.training.batch_size=32 is larger than the training split, which '
                                       r'holds 16 images'):
    run_lib.train(config, str(workdir))
  assert not workdir.exists()

  config.training.batch_size = 4
  config.eval.batch_size = 8
  workdir.mkdir()
  with pytest.raises(ValueError, match=r"config.eval.batch_size=8 is larger than the 'test' split, which holds 4 "
                                       r'examples: eval.enable_loss and eval.enable_fp_residual'):
    run_lib.evaluate(config, str(workdir))
  assert os.listdir(workdir) == []
