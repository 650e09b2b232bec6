"""main.py run for real, as a user runs it: a subprocess with absl flags and `--config.x=y` overrides."""

import os
import subprocess
import sys

import numpy as np

import checkpoints
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, 'tests', 'configs_tiny.py')


def _main(*args, timeout=300):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2', OMP_NUM_THREADS='2')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_main_train_then_eval(tmp_path):
  rng = np.random.default_rng(0)
  data = str(tmp_path / 'data.npz')
  np.savez(data, train=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
  workdir = str(tmp_path / 'w')
  common = [f'--config={TINY_CONFIG}', f'--workdir={workdir}', f'--config.data.path={data}',
            '--config.training.snapshot_sampling=False', '--config.training.alpha=0.02']
  result = _main(*common, '--mode=train', '--config.training.n_iters=2')
  assert result.returncode == 0, result.stderr[-3000:]
  log = open(os.path.join(workdir, 'stdout.txt')).read()
  assert 'step: 2, training_loss:' in log and 'fp_vector' in log
  # The override reached the config.
  assert 'alpha: 0.02' in log
  ckpt = checkpoints.load_checkpoint_file(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth'))
  assert int(ckpt['step']) == 2

  # Eval mode (loss only; bits/dim, samples and the residual are tested in-process in test_run_lib.py).
  result = _main(*common, '--mode=eval', '--eval_folder=ev', '--config.eval.begin_ckpt=1',
                 '--config.eval.end_ckpt=1', '--config.eval.enable_bpd=False',
                 '--config.eval.enable_fp_residual=False')
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(os.path.join(workdir, 'ev', 'ckpt_1_loss.npz')) as f:
    assert f['all_losses'].shape == (1,) and np.isfinite(f['mean_loss'])
    assert 'all_fp_vector' in f.files
  log = open(os.path.join(workdir, 'stdout.txt')).read()
  assert 'step: 2, training_loss:' in log  # appended: the training run's log is kept
  assert 'mode: eval' in log and 'ckpt: 1, eval_loss:' in log


def test_main_requires_its_flags_and_reports_bad_values(tmp_path):
  result = _main(f'--config={TINY_CONFIG}', f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert '--mode' in result.stderr
  workdir = str(tmp_path / 'w')
  result = _main(f'--config={TINY_CONFIG}', f'--workdir={workdir}', '--mode=train',
                 '--config.training.sde=vesdee')
  assert result.returncode != 0
  assert "config.training.sde='vesdee'" in result.stderr
  # The failure is in the log too, and the failed start wrote nothing else.
  assert "config.training.sde='vesdee'" in open(os.path.join(workdir, 'stdout.txt')).read()
  assert os.listdir(workdir) == ['stdout.txt']

  # Evaluation of a mistyped workdir: an error, and no workdir created (not even for its log).
  typo = str(tmp_path / 'typo')
  result = _main(f'--config={TINY_CONFIG}', f'--workdir={typo}', '--mode=eval', '--config.data.path=unused.npz',
                 '--config.eval.enable_bpd=False', '--config.eval.enable_fp_residual=False',
                 '--config.eval.enable_loss=False')
  assert result.returncode == 1
  assert f"The workdir '{typo}' does not exist" in result.stderr
  assert not os.path.exists(typo)


def test_a_failure_is_one_line_with_the_traceback_in_the_log(tmp_path):
  workdir = str(tmp_path / 'w')
  args = [f'--config={TINY_CONFIG}', f'--workdir={workdir}', '--mode=train', '--config.training.sde=vesdee']
  result = _main(*args)
  assert result.returncode == 1
  # The message once on the console, no traceback there; the traceback in the log.
  assert result.stderr.count("config.training.sde='vesdee'") == 1
  assert 'Traceback' not in result.stderr
  assert f'(traceback in {os.path.join(workdir, "stdout.txt")}; --traceback prints it here)' in result.stderr
  log = open(os.path.join(workdir, 'stdout.txt')).read()
  assert 'train failed: ValueError: config.training.sde=' in log and 'Traceback (most recent call last)' in log
  # --traceback: the traceback on the console too, once.
  result = _main(*args, '--traceback')
  assert result.returncode == 1
  assert result.stderr.count('Traceback (most recent call last)') == 1


def test_config_path_and_override_typos_are_one_line_each():
  result = _main('--config=configs/fp/nope.py', '--workdir=unused', '--mode=train')
  assert result.returncode == 1
  assert result.stderr.splitlines()[0] == ("FATAL Flags parsing error: --config=configs/fp/nope.py: the config file "
                                           f"'configs/fp/nope.py' does not exist (relative to the current directory "
                                           f'{ROOT}).')
  assert 'Traceback' not in result.stderr and len(result.stderr.splitlines()) == 2
  result = _main(f'--config={TINY_CONFIG}', '--workdir=unused', '--mode=train', '--config.training.alpah=0.1')
  assert result.returncode == 1
  assert result.stderr.splitlines()[0] == (f"FATAL Flags parsing error: --config.training.alpah: config.training "
                                           f"({TINY_CONFIG}) has no field 'alpah'; nearest: training.alpha.")
  assert 'Traceback' not in result.stderr and len(result.stderr.splitlines()) == 2
  result = _main(f'--config={TINY_CONFIG}', '--workdir=unused', '--mode=compare')
  assert result.returncode == 1 and '--mode=compare needs --baseline_workdir' in result.stderr


def test_missing_field_message_walks_the_path():
  import main  # pylint: disable=g-import-not-at-top
  from tests import configs_tiny  # pylint: disable=g-import-not-at-top
  config = configs_tiny.get_config()
  assert main.missing_field_message(config, 'training.alpha', 'c.py') is None
  assert main.missing_field_message(config, 'trainin.alpha', 'c.py') == (
      "--config.trainin.alpha: the config (c.py) has no field 'trainin'; nearest: training.")
  message = main.missing_field_message(config, 'eval.zzzz', 'c.py')
  assert message.startswith("--config.eval.zzzz: config.eval (c.py) has no field 'zzzz'; the fields there: ")
  assert 'eval.bpd_num_repeats' in message
  assert main.config_argument(['--mode=x', '--config', 'a.py:toy']) == 'a.py:toy'
  assert main.override_fields(['--config=a.py', '--config.a.b=1', '--noconfig.c']) == ['a.b', 'c']
