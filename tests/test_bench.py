"""The benchmarks run end to end at a tiny size and print their tables (numbers are not checked here)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_fp_step_bench_puts_dsm_first_and_prints_every_row():
  out = _run('bench/bench_fp_step.py', '--batch', '2', '--nf', '16', '--num_res_blocks', '1', '--steps', '1',
             '--warmup', '0', '--models', 'vp_ddpmpp', '--variants', 'dsm+fp (1/4 batch),dsm', '--fp_every', '1,2')
  rows = [line.split('|') for line in out.splitlines() if line.startswith('| vp_ddpmpp')]
  # DSM once (nothing to schedule), then each FP variant at every fp_every.
  assert [(row[2].strip(), row[3].strip()) for row in rows] == [('dsm', '-'), ('dsm+fp (1/4 batch)', '1'),
                                                                 ('dsm+fp (1/4 batch)', '2')]
  assert all(row[5].strip().endswith('x') for row in rows)  # every row has its ratio to DSM


@pytest.mark.parametrize('script', ['bench/bench_fp_step.py', 'bench/bench_ranks.py'])
def test_benches_do_not_import_tensorflow(script):
  # The GPU image has no TensorFlow: model, loss, trainer and benchmark code must import without it.
  code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
          f"try:\n  runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit:\n  pass\n"
          "print('tensorflow imported:', 'tensorflow' in sys.modules)")
  assert 'tensorflow imported: False' in _run('-c', code)


def test_ranks_bench_runs_under_torchrun():
  out = _run('bench/bench_ranks.py', '--ranks', '1', '--batch', '2', '--steps', '1', '--warmup', '0')
  rows = [line for line in out.splitlines() if line.startswith('| 1 |')]
  assert len(rows) == 1 and rows[0].endswith('1.00x |')


def test_likelihood_bench_prints_both_backends_and_the_projection_without_tensorflow():
  # One run: the table, then whether TensorFlow was imported (the GPU image has none).
  argv = ['bench_likelihood.py', '--device', 'cpu', '--tiny', '--batch', '2', '--rtol', '0.1', '--atol', '0.1',
          '--threads', '1']
  code = (f"import runpy, sys; sys.argv = {argv!r}\n"
          "runpy.run_path('bench/bench_likelihood.py', run_name='__main__')\n"
          "print('tensorflow imported:', 'tensorflow' in sys.modules)")
  out = _run('-c', code)
  rows = [line.split('|') for line in out.splitlines() if line.startswith('| ve_ncsnpp')]
  assert [row[2].strip() for row in rows] == ['scipy', 'torch']
  for row in rows:
    assert int(row[3]) > 0 and float(row[4]) > 0  # NFE, seconds per batch
    assert float(row[9]) > 0 and float(row[10]) == pytest.approx(5 * float(row[9]), rel=0.01)  # projections
  assert rows[0][6].strip() == '1.00x' and rows[1][6].strip().endswith('x')  # ratio to scipy
  assert 'Projection:' in out
  assert 'tensorflow imported: False' in out


def test_dropout_scale_bench_prints_the_three_settings(capsys):
  import runpy
  module = runpy.run_path(os.path.join(ROOT, 'bench', 'measure_dropout_scale.py'))
  module['main'](['--repeats', '2', '--batch', '2', '--image_size', '8', '--nf', '8'])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| dropout')]
  assert [row.split('|')[1].strip() for row in rows] == [
      'dropout 0.1, masks shared (default)', 'dropout 0.1, masks independent (released)', 'dropout off']
  shared, independent, off = (float(row.split('|')[2].split('+-')[0]) for row in rows)
  # Fixed seeds: the released masks' difference quotient dominates; one set of masks stays near dropout off.
  assert independent > 3 * shared and shared < 3 * off
