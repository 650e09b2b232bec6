"""Fault-injection matrix: how training and evaluation survive how real jobs die, and which bad inputs are refused.

  python bench/fault_matrix.py                      # everything (about 15 minutes on 2 busy CPU cores)
  python bench/fault_matrix.py --only inputs        # bad inputs only (in this process, a few minutes)
  python bench/fault_matrix.py --only faults --kills 4

Faults run the tiny 2-D config of tests/configs_tiny.py in real subprocesses (main.py, or tests/fault_worker.py
where a fault must hit an exact moment, tests/full_disk.py for a full disk): SIGKILL at random moments and at the
worst moments of a save, SIGTERM, Ctrl-C, SIGHUP, a second signal, two trainers, stale and dangling locks, damaged
checkpoints, exploding and NaN weights, evaluation with nothing to wait for, full disks (a simulated ENOSPC, and a
real EFBIG from a file size limit). A fault is *survived* when its oracle holds: no work lost beyond what the kind
of death allows (a resumed run ends with every snapshot and nothing left over), no hang, and an exit status and
message that say what happened. Bad inputs are config values, data, result folders outside the workdir and
damaged optimizer states that must be *refused* before anything is written, by an error naming the field (or the
file) and the value. Prints one table row per case and the totals.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import checkpoints  # noqa: E402
import datasets  # noqa: E402
import preemption  # noqa: E402
import run_lib  # noqa: E402
import utils  # noqa: E402
from tests import configs_tiny  # noqa: E402
from tests import helpers  # noqa: E402
from tests import torchrun_worker  # noqa: E402

TINY = os.path.join(ROOT, 'tests', 'configs_tiny.py')
QUICK = {'training.snapshot_sampling': False, 'training.eval_freq': 1000, 'training.log_freq': 5,
         'training.snapshot_freq': 4, 'training.snapshot_freq_for_preemption': 2, 'optim.warmup': 0,
         'training.n_iters': 40}
FOREVER = dict(QUICK, **{'training.n_iters': 10 ** 6, 'training.snapshot_freq': 10 ** 6,
                         'training.snapshot_freq_for_preemption': 10 ** 6})


def _env():
  return dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2', OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def _main(workdir, mode, overrides, *extra, script='main.py'):
  return [sys.executable, script, f'--config={TINY}:toy', f'--workdir={workdir}', f'--mode={mode}',
          *_flags(overrides), *extra]


def _worker(workdir, overrides, *extra):
  return [sys.executable, 'tests/fault_worker.py', workdir, json.dumps(overrides), *extra]


def _popen(cmd):
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(cmd, timeout=300, env=None):
  return subprocess.run(cmd, cwd=ROOT, env=dict(_env(), **(env or {})), capture_output=True, text=True,
                        timeout=timeout)


def _config(overrides):
  return torchrun_worker.config_with(overrides)


def _step(path):
  return int(checkpoints.load_checkpoint_file(path)['step'])


def _meta(workdir):
  return os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')


def _log(workdir):
  path = os.path.join(workdir, 'stdout.txt')
  return open(path).read() if os.path.exists(path) else ''


def _wait_for(predicate, timeout=240):
  start = time.time()
  while not predicate():
    if time.time() - start > timeout:
      raise AssertionError('timed out')
    time.sleep(0.1)


def _logged_step(workdir, at_least):
  steps = [int(s) for s in re.findall(r'step: (\d+), training_loss', _log(workdir))]
  return bool(steps) and max(steps) >= at_least


def _temp_files(workdir):
  return [os.path.join(d, f) for d, _, names in os.walk(workdir) for f in names if f.endswith('.tmp')]


def _finished_intact(workdir, n_iters, snapshot_freq):
  """The oracle of a run that was resumed to its end: every snapshot, the resume point at n_iters, no leftovers."""
  missing = [k for k in range(1, n_iters // snapshot_freq + 1)
             if not os.path.exists(os.path.join(workdir, 'checkpoints', f'checkpoint_{k}.pth'))]
  assert not missing, f'snapshots missing: {missing}'
  steps = [_step(os.path.join(workdir, 'checkpoints', f'checkpoint_{k}.pth'))
           for k in range(1, n_iters // snapshot_freq + 1)]
  assert steps == [k * snapshot_freq for k in range(1, n_iters // snapshot_freq + 1)], steps
  assert _step(_meta(workdir)) == n_iters
  assert not _temp_files(workdir), _temp_files(workdir)
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))


def _resume(workdir, overrides=QUICK):
  run_lib.train(_config(overrides), workdir)
  _finished_intact(workdir, overrides['training.n_iters'], overrides['training.snapshot_freq'])


def _expect_error(fn, pattern):
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    assert re.search(pattern, str(e)), f'{type(e).__name__}: {e}'
    assert '\n' not in str(e).strip(), 'not one line'
    return str(e)
  raise AssertionError('no error')


# ----------------------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------------------


def fault_random_kill(workdir, rng):
  proc = _popen(_worker(workdir, QUICK))
  _wait_for(lambda: os.path.exists(os.path.join(workdir, preemption.LOCK_NAME)) or proc.poll() is not None)
  time.sleep(rng.uniform(0., 6.))  # setup and about 40 steps on 2 busy cores
  proc.kill()
  proc.wait()
  _resume(workdir)
  return f'killed {"after the end" if proc.returncode == 0 else "at a random moment"}, resumed to the end'


def _targeted_kill(workdir, option, step):
  result = _run(_worker(workdir, QUICK, option, str(step)))
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  _resume(workdir)
  return f'{option} {step}: every snapshot after resume'


def fault_kill_between_saves(workdir, rng):
  return _targeted_kill(workdir, '--kill_before_meta_save', 8)


def fault_kill_during_meta_save(workdir, rng):
  return _targeted_kill(workdir, '--kill_during_meta_save', 8)


def fault_kill_during_snapshot_save(workdir, rng):
  return _targeted_kill(workdir, '--kill_during_snapshot_save', 12)


def fault_kill_during_final_meta_save(workdir, rng):
  return _targeted_kill(workdir, '--kill_during_meta_save', QUICK['training.n_iters'])


def _signal_run(workdir, signum, cmd=None):
  proc = _popen(cmd or _main(workdir, 'train', FOREVER))
  _wait_for(lambda: _logged_step(workdir, 10) or proc.poll() is not None)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  name = signal.Signals(signum).name
  assert proc.returncode == preemption.EXIT_STOPPED, (proc.returncode, stderr[-2000:])
  match = re.search(rf'Stopped by {name} at step (\d+): saved the resume point', _log(workdir))
  assert match, 'no log line'
  assert _step(_meta(workdir)) == int(match.group(1))
  assert 'Traceback' not in stderr
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))
  return int(match.group(1))


def _fault_stop_and_resume(signum):
  def fault(workdir, rng):
    step = _signal_run(workdir, signum)
    run_lib.train(_config(dict(FOREVER, **{'training.n_iters': step + 2})), workdir)
    assert _step(_meta(workdir)) == step + 2
    return f'exit 75, saved at step {step}, resumed from it'
  return fault


def fault_sigint(workdir, rng):
  step = _signal_run(workdir, signal.SIGINT)
  return f'Ctrl-C: exit 75, saved at step {step}, no traceback'


def fault_double_sigint(workdir, rng):
  proc = _popen(_worker(workdir, FOREVER, '--slow_stop_save', '60'))
  _wait_for(lambda: _logged_step(workdir, 10) or proc.poll() is not None)
  proc.send_signal(signal.SIGINT)
  _wait_for(lambda: 'fault_worker: stopping on a signal' in _log(workdir), timeout=60)
  time.sleep(1.5)
  start = time.time()
  proc.send_signal(signal.SIGINT)
  proc.communicate(timeout=30)
  assert proc.returncode == 130, proc.returncode
  assert time.time() - start < 20
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME)) and not _temp_files(workdir)
  return f'second Ctrl-C: exit 130 after {time.time() - start:.1f} s, lock released'


def fault_sigterm_during_setup(workdir, rng):
  proc = _popen(_main(workdir, 'train', FOREVER))
  _wait_for(lambda: os.path.exists(os.path.join(workdir, preemption.LOCK_NAME)) or proc.poll() is not None,
            timeout=240)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  # Handlers are installed right after the lock: a signal in that instant kills outright (143), a stale lock
  # then, which the next start takes over.
  assert proc.returncode in (preemption.EXIT_STOPPED, 143), proc.returncode
  run_lib.train(_config(dict(QUICK, **{'training.n_iters': 4})), workdir)
  assert _step(_meta(workdir)) == 4
  return f'exit {proc.returncode}, then resumed'


def fault_second_trainer(workdir, rng):
  first = _popen(_main(workdir, 'train', FOREVER))
  _wait_for(lambda: _logged_step(workdir, 5) or first.poll() is not None)
  second = _run(_main(workdir, 'train', FOREVER))
  assert second.returncode == 1 and f'held by PID {first.pid} on host' in second.stderr, second.stderr[-2000:]
  first.send_signal(signal.SIGTERM)
  first.communicate(timeout=120)
  assert first.returncode == preemption.EXIT_STOPPED
  return 'second trainer refused naming the first; the first unharmed'


def fault_two_trainers_at_once(workdir, rng):
  overrides = dict(QUICK, **{'training.n_iters': 400})
  procs = [_popen(_main(workdir, 'train', overrides)) for _ in range(2)]
  codes = sorted(p.wait(timeout=600) for p in procs)
  errors = ''.join(p.stderr.read() for p in procs)
  refused = codes == [0, 1] and 'Another trainer runs on this workdir' in errors
  # Or the second started after the first had finished: then it had nothing to train.
  assert refused or (codes == [0, 0] and 'nothing to train' in _log(workdir)), (codes, errors[-2000:])
  _finished_intact(workdir, overrides['training.n_iters'], overrides['training.snapshot_freq'])
  return 'exactly one ran; the other was refused' if refused else 'one after the other'


def fault_stale_lock(workdir, rng):
  dead = subprocess.Popen(['true'])
  dead.wait()
  os.makedirs(workdir)
  with open(os.path.join(workdir, preemption.LOCK_NAME), 'w') as f:
    json.dump({'pid': dead.pid, 'host': socket.gethostname(), 'token': 'x' * 32}, f)
  result = _run(_main(workdir, 'train', dict(QUICK, **{'training.n_iters': 4})))
  assert result.returncode == 0 and 'Took over the stale workdir lock' in _log(workdir), result.stderr[-2000:]
  return 'taken over with a log line'


def fault_eval_missing_workdir(workdir, rng):
  start = time.time()
  result = _run(_main(workdir, 'eval', {'eval.begin_ckpt': 1, 'eval.end_ckpt': 1}), timeout=300)
  assert result.returncode == 1 and 'does not exist' in result.stderr
  assert not os.path.exists(workdir)
  return f'error in {time.time() - start:.0f} s (process start included), workdir not created'


def _eval(workdir, begin, end, **fields):
  config = _config(QUICK)
  config.eval.begin_ckpt, config.eval.end_ckpt = begin, end
  config.eval.enable_bpd = config.eval.enable_sampling = config.eval.enable_fp_residual = False
  for name, value in fields.items():
    setattr(config.eval, name, value)
  run_lib.evaluate(config, workdir)


def fault_eval_empty_workdir(workdir, rng):
  os.makedirs(workdir)
  _expect_error(lambda: _eval(workdir, 1, 1), 'checkpoint_1.pth does not exist, and no trainer will write it')
  return 'stops at once naming the file'


def fault_eval_gap_after_training(workdir, rng):
  run_lib.train(_config(QUICK), workdir)
  os.remove(os.path.join(workdir, 'checkpoints', 'checkpoint_3.pth'))
  _expect_error(lambda: _eval(workdir, 2, 5), 'checkpoint_3.pth does not exist, and no trainer')
  return 'stops at the gap naming the file'


def fault_eval_gap_skipped(workdir, rng):
  run_lib.train(_config(QUICK), workdir)
  os.remove(os.path.join(workdir, 'checkpoints', 'checkpoint_3.pth'))
  _eval(workdir, 2, 5, skip_missing_ckpts=True)
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == [f'ckpt_{k}_loss.npz' for k in (2, 4, 5)]
  return 'eval.skip_missing_ckpts: evaluated 2, 4, 5'


def fault_eval_waits_for_trainer(workdir, rng):
  trainer = _popen(_main(workdir, 'train', dict(QUICK, **{'training.n_iters': 200, 'training.snapshot_freq': 200})))
  _wait_for(lambda: os.path.exists(os.path.join(workdir, preemption.LOCK_NAME)) or trainer.poll() is not None)
  eval_run = _run(_main(workdir, 'eval', dict(QUICK, **{
      'eval.begin_ckpt': 1, 'eval.end_ckpt': 1, 'eval.enable_bpd': False, 'eval.enable_sampling': False,
      'eval.enable_fp_residual': False})), timeout=600)
  trainer.wait(timeout=300)
  assert trainer.returncode == 0 and eval_run.returncode == 0, eval_run.stderr[-2000:]
  assert os.path.exists(os.path.join(workdir, 'eval', 'ckpt_1_loss.npz'))
  return 'waited while the trainer ran, then evaluated'


def fault_eval_wait_bounded(workdir, rng):
  trainer = _popen(_main(workdir, 'train', FOREVER))
  try:
    _wait_for(lambda: os.path.exists(os.path.join(workdir, preemption.LOCK_NAME)) or trainer.poll() is not None)
    start = time.time()
    _expect_error(lambda: _eval(workdir, 1, 1, wait_limit_seconds=2.), r'did not appear within 2 s')
    assert time.time() - start < 60
  finally:
    trainer.send_signal(signal.SIGTERM)
    trainer.communicate(timeout=120)
  return 'TimeoutError after eval.wait_limit_seconds while the trainer lives'


def fault_lr_explosion(workdir, rng):
  """The issue's reproduction: resume a good run with optim.lr=1e6 and a resume point every step."""
  run_lib.train(_config(QUICK), workdir)
  good = max(float(v.abs().max()) for v in checkpoints.load_checkpoint_file(_meta(workdir))['model'].values())
  bad = dict(QUICK, **{'optim.lr': 1e6, 'training.snapshot_freq_for_preemption': 1, 'training.n_iters': 60})
  message = _expect_error(lambda: run_lib.train(_config(bad), workdir), 'Not saving at step 41.*exploded.*last '
                                                                        'good checkpoint.*step 40')
  after = max(float(v.abs().max()) for v in checkpoints.load_checkpoint_file(_meta(workdir))['model'].values())
  assert _step(_meta(workdir)) == 40 and after == good, (after, good)
  return f'largest weight stays {after:.3g}; {message[:60]}...'


def fault_nan_weights(workdir, rng):
  result = _run(_worker(workdir, QUICK, '--nan_at', '9'))
  # Step 10 logs its (NaN) loss before its save: either check may speak first.
  assert result.returncode == 1 and re.search(r'Not saving at step 10|not finite \(NaN or inf\) at step 10',
                                              result.stderr), result.stderr[-2000:]
  assert 'The last good checkpoint is' in result.stderr and _step(_meta(workdir)) == 8
  return 'NaN after the update of step 9: resume point stays at step 8'


def _train_then_damage_ema(workdir, damage):
  """Trains the quick config, then applies `damage` in place to every EMA weight of checkpoint_1."""
  run_lib.train(_config(QUICK), workdir)
  path = os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth')
  loaded = checkpoints.load_checkpoint_file(path)
  for value in loaded['ema']['shadow_params']:
    damage(value)
  torch.save(loaded, path)


def fault_eval_nan_checkpoint(workdir, rng):
  _train_then_damage_ema(workdir, lambda value: value.fill_(float('nan')))
  _expect_error(lambda: _eval(workdir, 1, 1), r"checkpoint_1.pth' holds non-finite values")
  return 'refused, naming the file'


def fault_eval_non_finite_results(workdir, rng):
  _train_then_damage_ema(workdir, lambda value: value.mul_(1e30))
  config = QUICK
  result = _run(_main(workdir, 'eval', dict(config, **{
      'eval.begin_ckpt': 1, 'eval.end_ckpt': 1, 'eval.enable_bpd': False, 'eval.enable_sampling': False,
      'eval.enable_fp_residual': False})))
  assert result.returncode == 1 and 'is not finite' in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, 'eval', 'ckpt_1_loss.npz'))
  return 'exit 1, no loss file'


def _damage(path, kind):
  data = open(path, 'rb').read()
  os.remove(path)
  if kind == 'truncated':
    open(path, 'wb').write(data[:len(data) // 2])
  elif kind == 'empty':
    open(path, 'wb').close()
  elif kind == 'random':
    open(path, 'wb').write(os.urandom(len(data)))
  elif kind == 'dangling_link':
    os.symlink(path + '.moved', path)
  elif kind == 'directory':
    os.mkdir(path)


def _fault_damaged_meta(kind, pattern):
  def fault(workdir, rng):
    run_lib.train(_config(dict(QUICK, **{'training.n_iters': 4})), workdir)
    _damage(_meta(workdir), kind)
    before = sorted(os.listdir(os.path.join(workdir, 'checkpoints-meta')))
    _expect_error(lambda: run_lib.train(_config(QUICK), workdir), re.escape(repr(_meta(workdir))) + '.*' + pattern)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints-meta'))) == before
    return f'{kind}: one line naming the file'
  return fault


def fault_unwritable_meta_dir(workdir, rng):
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'checkpoints-meta'), 'w'):
    pass  # a file where the folder should be (as root, permissions do not stop writes)
  _expect_error(lambda: run_lib.train(_config(QUICK), workdir), 'checkpoints-meta.*resume point')
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth'))
  return 'refused before the first step'


def fault_torchrun_sigterm(workdir, rng):
  cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'main.py',
         f'--config={TINY}:toy', f'--workdir={workdir}', '--mode=train', *_flags(dict(FOREVER, **{
             'training.batch_size': 8}))]
  proc = _popen(cmd)
  _wait_for(lambda: _logged_step(workdir, 10) or proc.poll() is not None)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  match = re.search(r'Stopped by SIGTERM at step (\d+): saved the resume point', _log(workdir))
  assert match and _step(_meta(workdir)) == int(match.group(1)), _log(workdir)[-2000:]
  assert not os.path.exists(os.path.join(workdir, preemption.LOCK_NAME))
  return f'2 ranks stopped at step {match.group(1)}, rank 0 saved (torchrun exit {proc.returncode})'


def fault_sighup_under_nohup(workdir, rng):
  proc = subprocess.Popen(_main(workdir, 'train', FOREVER), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
  _wait_for(lambda: _logged_step(workdir, 10) or proc.poll() is not None)
  proc.send_signal(signal.SIGHUP)
  _wait_for(lambda: _logged_step(workdir, 20) or proc.poll() is not None)
  assert proc.poll() is None, 'SIGHUP stopped a run started under nohup'
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  assert proc.returncode == preemption.EXIT_STOPPED and 'Stopped by SIGTERM' in _log(workdir)
  return 'SIGHUP ignored as nohup asks; SIGTERM then stops it'


def _one_error_line(result, mode, text):
  """Asserts that a failed main.py run printed exactly one error line, holding `text`, and no traceback."""
  errors = [line for line in result.stderr.splitlines() if f'{mode} failed:' in line]
  assert result.returncode == 1 and len(errors) == 1 and text in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and 'Exception ignored' not in result.stderr, result.stderr[-2000:]


def fault_full_disk_resume_point(workdir, rng):
  run_lib.train(_config(dict(QUICK, **{'training.n_iters': 8})), workdir)
  # The toy checkpoint is 72 KB: the disk fills in the middle of torch.save of the resume point of step 10.
  result = _run(_main(workdir, 'train', QUICK, script='tests/full_disk.py'), env={'FULL_DISK_BYTES': '20000'})
  _one_error_line(result, 'train', f'WriteError: Cannot write checkpoint {_meta(workdir)}: [Errno 28] No space left '
                                   'on device')
  assert _step(_meta(workdir)) == 8 and not _temp_files(workdir)
  _resume(workdir)
  return 'one line naming the file; resume point kept at step 8; resumed to the end'


def fault_file_size_limit(workdir, rng):
  """A real OS error, not a simulated one: RLIMIT_FSIZE makes the kernel refuse writes past 40 KB (EFBIG)."""
  import resource  # pylint: disable=g-import-not-at-top
  limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))  # noqa: E731
  result = subprocess.run(_main(workdir, 'train', QUICK), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
  # The first save: the resume point of step 2.
  _one_error_line(result, 'train', f'WriteError: Cannot write checkpoint {_meta(workdir)}: [Errno 27] File too large')
  assert not _temp_files(workdir)
  _resume(workdir)
  return 'EFBIG: one line naming the file, no temporary file; resumed to the end'


def fault_full_disk_eval(workdir, rng):
  run_lib.train(_config(QUICK), workdir)
  result = _run(_main(workdir, 'eval', dict(QUICK, **{
      'eval.begin_ckpt': 1, 'eval.end_ckpt': 1, 'eval.enable_bpd': False, 'eval.enable_sampling': False,
      'eval.enable_fp_residual': False}), script='tests/full_disk.py'), env={'FULL_DISK_BYTES': '0'})
  loss_file = os.path.join(workdir, 'eval', 'ckpt_1_loss.npz')
  _one_error_line(result, 'eval', f'WriteError: Cannot write {loss_file}: [Errno 28] No space left on device')
  assert os.listdir(os.path.dirname(loss_file)) == []
  return 'one line naming the npz, nothing left in the folder'


def fault_dangling_lock(workdir, rng):
  os.makedirs(workdir)
  os.symlink(os.path.join(workdir, 'gone'), os.path.join(workdir, preemption.LOCK_NAME))
  result = _run(_main(workdir, 'train', dict(QUICK, **{'training.n_iters': 4})))
  assert result.returncode == 0 and 'which does not exist: no trainer can hold it' in _log(workdir), \
      result.stderr[-2000:]
  return 'taken over as a stale lock, with a log line'


def fault_numpy_integer_step(workdir, rng):
  run_lib.train(_config(dict(QUICK, **{'training.n_iters': 8})), workdir)
  loaded = checkpoints.load_checkpoint_file(_meta(workdir))
  loaded['step'] = np.int64(loaded['step'])  # a step counted with numpy, as other training loops save it
  torch.save(loaded, _meta(workdir))
  _resume(workdir)
  return 'resumed from step 8 (np.int64) to the end'


def faults(num_kills):
  cases = [(f'SIGKILL at a random moment #{i + 1}', fault_random_kill) for i in range(num_kills)]
  cases += [
      ('SIGKILL after the snapshot, before the resume point', fault_kill_between_saves),
      ('SIGKILL in the middle of writing the resume point', fault_kill_during_meta_save),
      ('SIGKILL in the middle of writing a snapshot', fault_kill_during_snapshot_save),
      ('SIGKILL in the middle of the final save', fault_kill_during_final_meta_save),
      ('SIGTERM', _fault_stop_and_resume(signal.SIGTERM)),
      ('SIGINT (Ctrl-C)', fault_sigint),
      ('a second SIGINT during the save', fault_double_sigint),
      ('SIGTERM as soon as the lock is taken', fault_sigterm_during_setup),
      ('a second trainer on a running workdir', fault_second_trainer),
      ('two trainers started together', fault_two_trainers_at_once),
      ('a stale lock of a dead process', fault_stale_lock),
      ('eval: mistyped workdir', fault_eval_missing_workdir),
      ('eval: workdir without checkpoints, no trainer', fault_eval_empty_workdir),
      ('eval: a missing checkpoint after training finished', fault_eval_gap_after_training),
      ('eval: a missing checkpoint, skip flag', fault_eval_gap_skipped),
      ('eval: checkpoint written while eval waits', fault_eval_waits_for_trainer),
      ('eval: trainer alive, checkpoint never comes', fault_eval_wait_bounded),
      ('optim.lr=1e6 on resume (weights explode)', fault_lr_explosion),
      ('NaN weights after an update', fault_nan_weights),
      ('eval of a checkpoint with NaN weights', fault_eval_nan_checkpoint),
      ('eval of a checkpoint giving non-finite results', fault_eval_non_finite_results),
      ('resume point truncated', _fault_damaged_meta('truncated', 'is truncated')),
      ('resume point empty', _fault_damaged_meta('empty', 'is empty')),
      ('resume point random bytes', _fault_damaged_meta('random', 'is not a PyTorch checkpoint')),
      ('resume point a dangling symlink', _fault_damaged_meta('dangling_link', 'symbolic link')),
      ('resume point a directory', _fault_damaged_meta('directory', 'is a directory')),
      ('checkpoints-meta not writable', fault_unwritable_meta_dir),
      ('SIGTERM under torchrun (2 ranks, gloo)', fault_torchrun_sigterm),
      ('SIGHUP (terminal closed, ssh session dropped)', _fault_stop_and_resume(signal.SIGHUP)),
      ('SIGHUP to a run started under nohup', fault_sighup_under_nohup),
      ('full disk (ENOSPC) while writing the resume point', fault_full_disk_resume_point),
      ('file size limit (a real EFBIG) while writing the resume point', fault_file_size_limit),
      ('full disk (ENOSPC) while writing an eval result', fault_full_disk_eval),
      ('a train.lock that is a symbolic link to nothing', fault_dangling_lock),
      ('resume point whose step is a numpy integer', fault_numpy_integer_step),
      ('SIGTERM on image data, resumed: bitwise the straight run', fault_exact_resume_after_sigterm),
  ]
  return cases


# ----------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------

# (field, bad value, mode[, base]): refused if the error names `config.<field>` and the value. The base config is
# the toy one (QUICK), with the overrides `base` gives so that the field is read at all (e.g. sampling fields with
# snapshot sampling on); 'npz' in it: the tiny NCSN++ image config on an NPZ file instead.
SAMPLING = {'training.snapshot_sampling': True}
BAD_VALUES = [
    ('training.sde', 'vesdee', 'train'), ('training.continuous', 1, 'train'),
    ('training.reduce_mean', 'yes', 'train'), ('training.likelihood_weighting', 0, 'train'),
    ('training.n_iters', -1, 'train'), ('training.n_iters', 2.5, 'train'), ('training.snapshot_freq', 0, 'train'),
    ('training.snapshot_freq_for_preemption', -3, 'train'), ('training.log_freq', 0, 'train'),
    ('training.eval_freq', 0, 'train'), ('training.batch_size', 0, 'train'),
    ('training.grad_accum_steps', 0, 'train'), ('training.grad_accum_steps', 3, 'train'),
    ('training.mixed_precision', 'fp8', 'train'), ('training.compile', 'yes', 'train'),
    ('training.snapshot_sampling', 'False', 'train'), ('training.alpha', -1., 'train'),
    ('training.beta', float('nan'), 'train'), ('training.m', 0, 'train'), ('training.scalar_fp', 'maybe', 'train'),
    ('training.fp_wgt_type', 'lol', 'train'), ('training.fp_dist', 'nowhere', 'train'),
    ('training.fp_time_derivative', 'exact', 'train'), ('training.fp_fd_hs', 0., 'train'),
    ('training.fp_fd_hd', -1., 'train'), ('training.fp_divergence', 'magic', 'train'),
    ('training.fp_hutchinson_type', 'uniform', 'train'), ('training.fp_num_probes', 0, 'train'),
    ('training.fp_batch_fraction', 1.5, 'train'), ('training.fp_batch_fraction', 0., 'train'),
    ('training.max_param_growth', 1., 'train'), ('training.max_param_growth', -2., 'train'),
    ('optim.lr', -1., 'train'), ('optim.warmup', -5, 'train'), ('optim.optimizer', 'SGDX', 'train'),
    ('optim.grad_clip', 'big', 'train'), ('optim.beta1', 1.5, 'train'), ('optim.eps', -1., 'train'),
    ('model.ema_rate', 1.5, 'train'), ('model.name', 'nope', 'train'), ('model.num_scales', 0, 'train'),
    ('model.sigma_min', -1., 'train'), ('model.sigma_max', 0., 'train'),
    ('model.beta_min', -0.1, 'train', {'training.sde': 'vpsde'}),
    ('model.dropout', 2., 'train', {'npz': True}), ('model.embedding_type', 'nope', 'train'),
    ('model.nf', 0, 'train'),
    ('sampling.method', 'nope', 'train', SAMPLING), ('sampling.predictor', 'nope', 'train', SAMPLING),
    ('sampling.corrector', 'nope', 'train', SAMPLING), ('sampling.snr', -1., 'train', SAMPLING),
    ('sampling.n_steps_each', 0, 'train', SAMPLING), ('sampling.probability_flow', 'yes', 'train', SAMPLING),
    ('sampling.noise_removal', 1, 'train', SAMPLING),
    ('data.dataset', 'NOPE', 'train'), ('data.centered', 1, 'train'), ('data.uniform_dequantization', True, 'train'),
    ('data.toy', 'nope', 'train'), ('data.random_flip', 'no', 'train', {'npz': True}),
    ('data.toy_eval_batches', 0, 'train'), ('seed', -1, 'train'), ('seed', 1.5, 'train'),
    ('eval.batch_size', 0, 'eval'), ('eval.begin_ckpt', -1, 'eval'), ('eval.end_ckpt', 0, 'eval'),
    ('eval.enable_loss', 1, 'eval'), ('eval.enable_bpd', 'True', 'eval'), ('eval.bpd_dataset', 'valid', 'eval'),
    ('eval.bpd_num_repeats', 0, 'eval'), ('eval.num_samples', 0, 'eval'), ('eval.enable_fp_residual', 1, 'eval'),
    ('eval.fp_residual_num_times', 0, 'eval'), ('eval.wait_limit_seconds', -1., 'eval'),
    ('eval.skip_missing_ckpts', 'yes', 'eval'),
]


def _snapshot(root):
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      files[os.path.relpath(path, root)] = open(path, 'rb').read()
  return files


def _refused(workdir, config, mode, *needles):
  os.makedirs(workdir, exist_ok=True)
  before = _snapshot(workdir)
  try:
    if mode == 'train':
      run_lib.train(config, workdir)
    else:
      run_lib.evaluate(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    assert _snapshot(workdir) == before, 'wrote into the workdir'
    missing = [n for n in needles if n not in message]
    assert not missing, f'{type(e).__name__} does not name {missing}: {message[:200]}'
    return f'{type(e).__name__}: {message[:90]}'
  raise AssertionError('accepted')


def _bad_value_case(field, value, mode, base=None):
  base = dict(base or {})
  npz = base.pop('npz', False)

  def case(workdir):
    # Through a plain dict: a ConfigDict refuses a value of another type than its field's (a hand-written config
    # file, or a config built in code, has no such check).
    if npz:
      config = _npz_config(os.path.dirname(workdir))[0]
    else:
      config = _config(dict(QUICK, **{'training.n_iters': 1}, **base))
    tree = config.to_dict()
    node = tree
    *sections, name = field.split('.')
    for section in sections:
      node = node[section]
    node[name] = value
    config = ml_collections.ConfigDict(tree)
    if mode == 'eval':
      config.eval.wait_limit_seconds = 0. if field != 'eval.wait_limit_seconds' else value
    shown = repr(value)
    return _refused(workdir, config, mode, field, shown)
  return case


def _npz_config(tmp, **arrays):
  rng = np.random.default_rng(0)
  default = dict(train=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                 test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
  default.update(arrays)
  path = os.path.join(tmp, 'data.npz')
  np.savez(path, **{k: v for k, v in default.items() if v is not None})
  config = configs_tiny.get_config()
  config.data.path = path
  config.training.n_iters = 1
  config.training.snapshot_sampling = False
  return config, path


def _data_case(kind):
  def case(workdir):
    tmp = os.path.dirname(workdir)
    rng = np.random.default_rng(0)
    if kind == 'npz_missing':
      config, _ = _npz_config(tmp)
      config.data.path = os.path.join(tmp, 'nope.npz')
      return _refused(workdir, config, 'train', 'config.data.path', 'nope.npz')
    if kind == 'npz_empty_path':
      config, _ = _npz_config(tmp)
      config.data.path = ''
      return _refused(workdir, config, 'train', "config.data.path=''")
    if kind == 'npz_float':
      config, path = _npz_config(tmp, train=rng.random((16, 8, 8, 3)))
      return _refused(workdir, config, 'train', path, "'train'", 'float64')
    if kind == 'npz_size':
      config, path = _npz_config(tmp, train=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
      return _refused(workdir, config, 'train', path, 'config.data.image_size=8')
    if kind == 'npz_channels':
      config, path = _npz_config(tmp, test=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8))
      return _refused(workdir, config, 'train', path, 'config.data.num_channels=3')
    if kind == 'npz_no_test':
      config, path = _npz_config(tmp, test=None)
      return _refused(workdir, config, 'train', path, "'test' is missing")
    if kind == 'npz_not_zip':
      config, path = _npz_config(tmp)
      open(path, 'wb').write(b'not an npz')
      return _refused(workdir, config, 'train', path)
    if kind == 'train_batch_too_large':
      config, _ = _npz_config(tmp)
      config.training.batch_size = 32
      return _refused(workdir, config, 'train', 'config.training.batch_size=32', 'holds 16 images')
    if kind == 'eval_batch_too_large':
      config, _ = _npz_config(tmp)
      config.eval.batch_size = 8
      return _refused(workdir, config, 'eval', 'config.eval.batch_size=8', 'holds 4 examples')
    if kind == 'bpd_batch_too_large':
      config, _ = _npz_config(tmp)
      config.eval.batch_size = 32
      config.eval.enable_loss = config.eval.enable_fp_residual = False
      config.eval.bpd_dataset = 'train'
      return _refused(workdir, config, 'eval', 'config.eval.batch_size=32', "'train' split", 'holds 16')
    raise AssertionError(kind)
  return case


DATA_CASES = ['npz_missing', 'npz_empty_path', 'npz_float', 'npz_size', 'npz_channels', 'npz_no_test',
              'npz_not_zip', 'train_batch_too_large', 'eval_batch_too_large', 'bpd_batch_too_large']


def _eval_folder_case(kind):
  def case(workdir):
    tmp = os.path.dirname(workdir)
    os.makedirs(os.path.join(workdir, 'checkpoints'))
    folder = {'absolute': os.path.join(tmp, 'outside'), 'dotdot': '../outside', 'dotdot_inside': 'eval/../../outside',
              'symlink': 'link/eval'}[kind]
    os.symlink(os.path.join(tmp, 'outside'), os.path.join(workdir, 'link'))
    config = _config(dict(QUICK, **{'eval.begin_ckpt': 1, 'eval.end_ckpt': 1, 'eval.wait_limit_seconds': 0.}))
    before = sorted(os.listdir(tmp))
    message = _expect_error(lambda: run_lib.evaluate(config, workdir, folder), 'outside the workdir')
    assert f'--eval_folder={folder!r}' in message and '--allow_outside_workdir' in message, message
    assert sorted(os.listdir(tmp)) == before, 'created something'
    return message[:90]
  return case


# A trained toy resume point, damaged in one field of its optimizer state: (what, damage of the loaded dict, the
# field the error must name).
OPTIMIZER_DAMAGE = [
    ('Adam exp_avg of the wrong shape', lambda o: o['state'][0].update(exp_avg=torch.zeros(7)), 'state[0].exp_avg'),
    ('Adam exp_avg_sq of an integer dtype',
     lambda o: o['state'][0].update(exp_avg_sq=o['state'][0]['exp_avg_sq'].long()), 'state[0].exp_avg_sq'),
    ('a state for no parameter', lambda o: o['state'].update({99: {'step': torch.tensor(1.)}}), 'state[99]'),
    ('step NaN', lambda o: o['state'][0].update(step=torch.tensor(float('nan'))), 'state[0].step'),
    ('eps NaN', lambda o: o['param_groups'][0].update(eps=float('nan')), 'param_groups[0].eps is nan'),
    ('betas (NaN, 0.999)', lambda o: o['param_groups'][0].update(betas=(float('nan'), 0.999)),
     'param_groups[0].betas is (nan, 0.999)'),
    ('weight_decay inf', lambda o: o['param_groups'][0].update(weight_decay=float('inf')),
     'param_groups[0].weight_decay is inf'),
    ('lr inf', lambda o: o['param_groups'][0].update(lr=float('inf')), 'param_groups[0].lr is inf'),
]
_TRAINED = {}


def _optimizer_case(damage, field):
  def case(workdir):
    if 'dir' not in _TRAINED:  # trained once, copied for each case
      _TRAINED['dir'] = tempfile.mkdtemp(prefix='fault_matrix_trained_')
      run_lib.train(_config(dict(QUICK, **{'training.n_iters': 4})), os.path.join(_TRAINED['dir'], 'w'))
    shutil.copytree(os.path.join(_TRAINED['dir'], 'w'), workdir)
    loaded = checkpoints.load_checkpoint_file(_meta(workdir))
    damage(loaded['optimizer'])
    torch.save(loaded, _meta(workdir))
    return _refused(workdir, _config(QUICK), 'train', repr(_meta(workdir)), field)
  return case


def inputs():
  cases = [(f'config.{case[0]}={case[1]!r} ({case[2]})', _bad_value_case(*case)) for case in BAD_VALUES]
  cases += [(f'data: {kind}', _data_case(kind)) for kind in DATA_CASES]
  cases += [(f'--eval_folder outside the workdir: {kind}', _eval_folder_case(kind))
            for kind in ('absolute', 'dotdot', 'dotdot_inside', 'symlink')]
  cases += [(f'resume point optimizer: {what}', _optimizer_case(damage, field))
            for what, damage, field in OPTIMIZER_DAMAGE]
  cases += hostile_inputs()
  return cases


# Issue 24's bad inputs: non-finite (and absurd) numbers, input paths that are not regular files, NPZ files whose
# headers lie, and a folder of images holding a FIFO. Each is refused (or, for images_to_npz, skipped) at once,
# with one line naming the field or the file; a deadline turns a hang into a failure.
NON_FINITE_VALUES = [
    ('training.alpha', float('inf'), 'train'), ('training.beta', float('inf'), 'train'),
    ('training.alpha', 1e30, 'train'), ('training.m', float('inf'), 'train'), ('optim.lr', float('inf'), 'train'),
    ('optim.eps', float('inf'), 'train'), ('optim.weight_decay', float('inf'), 'train'),
    ('optim.grad_clip', float('inf'), 'train'), ('optim.beta1', float('nan'), 'train'),
    ('model.ema_rate', float('nan'), 'train'), ('model.sigma_max', float('inf'), 'train'),
    ('model.fourier_scale', float('inf'), 'train'), ('model.dropout', float('nan'), 'train', {'npz': True}),
    ('sampling.snr', float('inf'), 'train', SAMPLING), ('training.max_param_growth', float('nan'), 'train'),
    ('eval.wait_limit_seconds', float('nan'), 'eval'),
]


def _hostile_data_case(kind):

  def case(workdir):
    tmp = os.path.dirname(workdir)
    config, path = _npz_config(tmp)
    os.remove(path)
    test = helpers.npy_member((4, 8, 8, 3), data=bytes(4 * 192))
    if kind == 'data.path -> /dev/zero':
      os.symlink('/dev/zero', path)
      needles = (path, 'character device')
    elif kind == 'data.path a FIFO':
      os.mkfifo(path)
      needles = (path, 'FIFO')
    elif kind == 'data.path a directory':
      os.mkdir(path)
      needles = (path, 'directory')
    elif kind == 'data.path a dangling symlink':
      os.symlink(os.path.join(tmp, 'gone.npz'), path)
      needles = (path, 'gone.npz', 'does not exist')
    elif kind == 'npz 5-D array':
      np.savez(path, train=np.zeros((16, 8, 8, 3, 1), np.uint8), test=np.zeros((4, 8, 8, 3), np.uint8))
      needles = (path, "'train'", '5 dimensions')
    elif kind == 'npz 0 training images':
      np.savez(path, train=np.zeros((0, 8, 8, 3), np.uint8), test=np.zeros((4, 8, 8, 3), np.uint8))
      needles = (path, "'train'", 'no images')
    elif kind == 'npz 1-row object array':
      np.savez(path, train=np.array([None], dtype=object), test=np.zeros((4, 8, 8, 3), np.uint8))
      needles = (path, "'train'", 'dtype object')
    elif kind == 'npz empty file':
      open(path, 'wb').close()
      needles = (path, 'could not be read as an .npz')
    elif kind == 'npz truncated':
      helpers.write_npz(path)
      with open(path, 'r+b') as f:
        f.truncate(300)
      needles = (path, 'could not be read as an .npz')
    elif kind == 'npz header claiming 10^9 images':
      helpers.write_zip(path, {'train.npy': helpers.npy_member((10 ** 9, 8, 8, 3), data=bytes(192)),
                               'test.npy': test}, zipfile.ZIP_DEFLATED)
      needles = (path, "'train'", '(1000000000, 8, 8, 3)', 'truncated or corrupt')
    elif kind == 'npz larger than memory':
      helpers.write_npz(path)
      needles = (path, 'in memory')
    else:
      raise AssertionError(kind)
    memory_bytes = datasets.memory_bytes
    if kind == 'npz larger than memory':
      datasets.memory_bytes = lambda: 1000
    try:
      with helpers.deadline(120):
        return _refused(workdir, config, 'train', *needles)
    finally:
      datasets.memory_bytes = memory_bytes
  return case


def _images_to_npz_with_a_fifo(workdir):
  folder = os.path.join(os.path.dirname(workdir), 'images')
  os.makedirs(folder)
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(os.path.join(folder, f'{i}.png'))
  os.mkfifo(os.path.join(folder, 'pipe.png'))
  os.symlink('/dev/zero', os.path.join(folder, 'zero.png'))
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  root, level = logging.getLogger(), logging.getLogger().level
  root.addHandler(handler)
  root.setLevel(logging.WARNING)  # main() silences everything below errors
  try:
    with helpers.deadline(120):
      counts = datasets.images_to_npz(folder, os.path.join(folder, 'out.npz'), test_fraction=0.25)
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  skipped = [r.getMessage() for r in records if 'Skipping' in r.getMessage()]
  assert counts == {'train': 3, 'test': 1} and len(skipped) == 2, (counts, skipped)
  return 'skipped with warnings: ' + '; '.join(m[m.index('images'):] for m in skipped)[:90]


HOSTILE_DATA_CASES = ['data.path -> /dev/zero', 'data.path a FIFO', 'data.path a directory',
                      'data.path a dangling symlink', 'npz 5-D array', 'npz 0 training images',
                      'npz 1-row object array', 'npz empty file', 'npz truncated', 'npz header claiming 10^9 images',
                      'npz larger than memory']


def hostile_inputs():
  """Issue 24's bad-input cases: (name, case(workdir)) pairs."""
  cases = [(f'config.{case[0]}={case[1]!r} ({case[2]})', _bad_value_case(*case)) for case in NON_FINITE_VALUES]
  cases += [(f'data: {kind}', _hostile_data_case(kind)) for kind in HOSTILE_DATA_CASES]
  cases.append(('images_to_npz: a FIFO named pipe.png, a link to /dev/zero', _images_to_npz_with_a_fifo))
  return cases


def fault_exact_resume_after_sigterm(workdir, rng):
  """Image data (NPZ): stopped by SIGTERM at a random step and resumed, the run ends with bitwise the weights of
  the uninterrupted run (every run in a subprocess of the same settings: one thread, as the others here)."""
  del rng
  _, path = _npz_config(os.path.dirname(workdir), train=np.random.default_rng(1).integers(
      0, 256, (6, 8, 8, 3), dtype=np.uint8))  # 6 images in batches of 4: batches straddle epochs
  overrides = {'data.path': path, 'training.alpha': 0., 'training.beta': 0., 'training.snapshot_sampling': False,
               'training.eval_freq': 1000, 'training.log_freq': 1, 'training.snapshot_freq_for_preemption': 1000,
               'training.n_iters': 10 ** 6, 'training.snapshot_freq': 10 ** 6}

  def cmd(where, **more):
    return [sys.executable, 'main.py', f'--config={TINY}', f'--workdir={where}', '--mode=train',
            *_flags(dict(overrides, **more))]

  stopped = _signal_run(workdir, signal.SIGTERM, cmd(workdir))
  straight = os.path.join(os.path.dirname(workdir), 'straight')
  for where in (workdir, straight):
    proc = _run(cmd(where, **{'training.n_iters': stopped + 3}))
    assert proc.returncode == 0, proc.stderr[-2000:]
  resumed, uninterrupted = (checkpoints.load_checkpoint_file(_meta(w)) for w in (workdir, straight))
  for part in ('model', 'ema', 'optimizer'):
    helpers.assert_bitwise_equal(resumed[part], uninterrupted[part], part)
  return f'stopped at step {stopped}, resumed to {stopped + 3}: weights bitwise those of the straight run'


# ----------------------------------------------------------------------------------------------------------


def _run_cases(title, cases, fn, verbose, name_filter=''):
  cases = [(name, case) for name, case in cases if name_filter in name]
  print(f'\n## {title}\n\n| # | case | result | detail |\n| --- | --- | --- | --- |', flush=True)
  ok = 0
  for i, (name, case) in enumerate(cases, 1):
    tmp = tempfile.mkdtemp(prefix='fault_matrix_')
    start = time.time()
    try:
      with contextlib.redirect_stderr(io.StringIO()):
        detail = fn(case, os.path.join(tmp, 'w'))
      passed = True
    except Exception as e:  # pylint: disable=broad-except
      detail = f'{type(e).__name__}: {e}'.replace('\n', ' ')[:200]
      if verbose:
        traceback.print_exc()
      passed = False
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    ok += passed
    print(f'| {i} | {name} | {"ok" if passed else "FAILED"} | {detail} ({time.time() - start:.0f} s) |', flush=True)
  return ok, len(cases)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', choices=('faults', 'inputs'), default=None)
  parser.add_argument('--kills', type=int, default=12, help='SIGKILLs at random moments')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--filter', default='', help='run only the cases whose name contains this')
  parser.add_argument('--verbose', action='store_true')
  args = parser.parse_args()
  logging.basicConfig(level=logging.ERROR)
  logging.getLogger().setLevel(logging.ERROR)
  rng = random.Random(args.seed)
  totals = {}
  if args.only in (None, 'faults'):
    totals['faults'] = _run_cases('Faults (survived = ok)', faults(args.kills),
                                  lambda case, workdir: case(workdir, rng), args.verbose, args.filter)
  if args.only in (None, 'inputs'):
    totals['inputs'] = _run_cases('Bad inputs (refused = ok)', inputs(), lambda case, workdir: case(workdir),
                                  args.verbose, args.filter)
  if 'dir' in _TRAINED:
    shutil.rmtree(_TRAINED['dir'], ignore_errors=True)
  print()
  if 'faults' in totals:
    print(f'faults injected: {totals["faults"][1]}, survived: {totals["faults"][0]}')
  if 'inputs' in totals:
    print(f'bad inputs: {totals["inputs"][1]}, refused: {totals["inputs"][0]}')


if __name__ == '__main__':
  main()
