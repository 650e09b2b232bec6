"""torchrun on the CPU (gloo): 2 ranks train and evaluate exactly as one process does on the same global batch.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node=2` as a user would; the
single-process runs they are compared with run in this process. The config is the tiny 2-D one with the
score-FPE regularizer on (both terms, Hutchinson probes, exact d_t s), so the gradients of the regularizer's
double backward, the batch-norm reduction of its scalar term and the probes all cross ranks.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import distributed
import run_lib
import utils
from tests import torchrun_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    'training.batch_size': 8, 'training.alpha': 0.5, 'training.beta': 0.1, 'training.scalar_fp': 'both',
    'training.fp_divergence': 'hutchinson', 'training.fp_time_derivative': 'forward_ad',
    'training.fp_batch_fraction': 1., 'training.n_iters': 3, 'training.snapshot_freq': 3,
    'training.snapshot_freq_for_preemption': 1, 'training.eval_freq': 2, 'training.log_freq': 1,
    'training.snapshot_sampling': False, 'optim.warmup': 0, 'eval.batch_size': 4,
}


def _torchrun(*args, timeout=300):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2', OMP_NUM_THREADS='1',
             PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  return result


def _files(root):
  """The files under root; TensorBoard event files (named after time, host and PID) as 'events.out.tfevents'."""
  files = (os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
  return sorted(f.split('.out.tfevents.')[0] + '.out.tfevents' if '.out.tfevents.' in f else f for f in files)


def _weights(path):
  return checkpoints.load_checkpoint_file(path)['model']


def _single_process_run(workdir, overrides):
  config = torchrun_worker.config_with(overrides)
  run_lib.train(config, workdir)
  return config


def test_two_ranks_train_and_resume_like_one_process(tmp_path):
  single, multi, out = str(tmp_path / 'single'), str(tmp_path / 'multi'), str(tmp_path / 'out')
  _single_process_run(single, OVERRIDES)
  _torchrun('tests/torchrun_worker.py', multi, out, json.dumps(OVERRIDES))

  # Both ranks end with the same parameters: the gradients were averaged once per step.
  ranks = [torch.load(os.path.join(out, f'rank{r}.pt')) for r in (0, 1)]
  assert ranks[0]['step'] == ranks[1]['step'] == 3
  for a, b in zip(ranks[0]['params'], ranks[1]['params']):
    torch.testing.assert_close(a, b, rtol=0, atol=0)
  # ... and the parameters of a single process on the same global batches, noise and probes.
  meta = os.path.join('checkpoints-meta', 'checkpoint.pth')
  expected, got = _weights(os.path.join(single, meta)), _weights(os.path.join(multi, meta))
  assert list(got) == list(expected)  # Score SDE's key layout ('module.' prefix) whatever the launcher
  for key in expected:
    torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)
  initial = run_lib.build_state(torchrun_worker.config_with(OVERRIDES))['model'].state_dict()
  assert any((got[k] - initial[k]).abs().max() > 1e-3 for k in got)  # training did move the weights
  # Rank 0 alone wrote: the same files as the single process (one TensorBoard event file).
  assert _files(multi) == _files(single)
  assert len(os.listdir(os.path.join(multi, 'tensorboard'))) == 1

  # Resume under torchrun: the step count continues, and still matches one process.
  longer = dict(OVERRIDES, **{'training.n_iters': 5})
  _single_process_run(single, longer)
  _torchrun('tests/torchrun_worker.py', multi, out, json.dumps(longer))
  assert torch.load(os.path.join(out, 'rank1.pt'))['step'] == 5
  expected, got = _weights(os.path.join(single, meta)), _weights(os.path.join(multi, meta))
  for key in expected:
    torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)


def test_two_ranks_train_lazily_like_one_process(tmp_path):
  """training.fp_every = 2 (lazy regularization): each rank decides from the global step alone which steps carry
  the FP terms (a rank that disagreed would hang in the scalar term's or the log's all-reduce: log_freq is 1),
  and the run matches one process on the same global batches."""
  overrides = dict(OVERRIDES, **{'training.fp_every': 2})
  single, multi, out = str(tmp_path / 'single'), str(tmp_path / 'multi'), str(tmp_path / 'out')
  _single_process_run(single, overrides)
  _torchrun('tests/torchrun_worker.py', multi, out, json.dumps(overrides))
  ranks = [torch.load(os.path.join(out, f'rank{r}.pt')) for r in (0, 1)]
  for a, b in zip(ranks[0]['params'], ranks[1]['params']):
    torch.testing.assert_close(a, b, rtol=0, atol=0)
  meta = os.path.join('checkpoints-meta', 'checkpoint.pth')
  expected, got = _weights(os.path.join(single, meta)), _weights(os.path.join(multi, meta))
  for key in expected:
    torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)


def test_main_under_torchrun_evaluates_like_one_process(tmp_path):
  workdir = str(tmp_path / 'w')
  config = _single_process_run(workdir, OVERRIDES)
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  # 3 batches of 4 points for the loss and bits/dim (an odd number: the last wave has one batch), and 3
  # sampling rounds: rank 0 takes batches 0 and 2, rank 1 batch 1.
  config.data.toy_eval_batches = 3
  config.eval.num_samples = 12
  run_lib.evaluate(config, workdir, 'single')
  flags = [f'--config.{name}={value}' for name, value in OVERRIDES.items()]
  flags += ['--config.eval.begin_ckpt=1', '--config.eval.end_ckpt=1', '--config.data.toy_eval_batches=3',
            '--config.eval.num_samples=12']
  _torchrun('main.py', f'--config={os.path.join(ROOT, "tests", "configs_tiny.py")}:toy',
            f'--workdir={workdir}', '--mode=eval', '--eval_folder=multi', *flags)
  single, multi = os.path.join(workdir, 'single'), os.path.join(workdir, 'multi')
  assert _files(multi) == _files(single)
  for name in _files(single):
    with np.load(os.path.join(single, name)) as a, np.load(os.path.join(multi, name)) as b:
      assert a.files == b.files, name
      for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f'{name}: {key}')
  # One log, written by rank 0 alone: every evaluation line once.
  log = open(os.path.join(workdir, 'stdout.txt')).read()
  assert log.count('ckpt: 1, eval_loss:') == 1 and log.count('mode: eval') == 1


def test_rank_shares_of_image_batches_make_the_global_batch(tmp_path):
  """The tf.data pipeline's share of each rank, concatenated, is the batch one process trains on."""
  from tests import configs_tiny
  import datasets
  config = configs_tiny.get_config()
  rng = np.random.default_rng(0)
  np.savez(tmp_path / 'd.npz', train=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
  config.data.path = str(tmp_path / 'd.npz')
  config.data.random_flip = True
  config.data.uniform_dequantization = True
  config.training.batch_size = 6
  data = datasets.get_data(config)

  def batches(ctx, n=5):
    stream = data.train_batches(7, ctx)
    return [next(stream) for _ in range(n)]

  whole = batches(distributed.Context())
  shares = [batches(distributed.Context(rank=r, world_size=3)) for r in range(3)]
  for step, batch in enumerate(whole):
    torch.testing.assert_close(torch.cat([share[step] for share in shares]), batch, rtol=0, atol=0)
  # The flips and the dequantization noise are drawn: batches differ from the raw images, and between steps.
  assert not torch.equal(whole[0], whole[1])
  with pytest.raises(ValueError, match='training.batch_size=6 does not divide over 4 processes'):
    batches(distributed.Context(rank=0, world_size=4))


# Rank arithmetic, with the ranks simulated in this process by `distributed.Context(rank=r, world_size=n)`.


def _ranks(world_size):
  return [distributed.Context(rank=r, world_size=world_size) for r in range(world_size)]


@pytest.mark.parametrize('world_size', [1, 2, 3, 4, 6])
def test_shares_of_the_ranks_tile_the_items_once_in_rank_order(world_size):
  items = list(range(12))
  shares = [items[distributed.share(12, ctx)] for ctx in _ranks(world_size)]
  assert [i for part in shares for i in part] == items
  assert {len(part) for part in shares} == {12 // world_size}


def test_share_defaults_to_the_current_context():
  assert distributed.share(5) == slice(0, 5)


def test_share_refuses_a_count_that_does_not_divide_naming_the_field():
  ctx = distributed.Context(rank=1, world_size=4)
  with pytest.raises(ValueError, match=r'config\.eval\.batch_size=10 does not divide over 4 processes'):
    distributed.share(10, ctx, field='eval.batch_size')
  with pytest.raises(ValueError, match=r'config\.training\.batch_size=6 does not divide over 4 processes'):
    distributed.share(6, ctx)


def test_check_divisible_returns_the_part_or_names_field_value_parts_and_why():
  assert distributed.check_divisible('training.batch_size', 24, 6, 'split evenly') == 4
  # The split over ranks, then micro-batches: one check of the product.
  what = 'parts (2 processes x config.training.grad_accum_steps=4 micro-batches)'
  why = 'the global batch is split over the ranks, then into micro-batches'
  expected = (r'^config\.training\.batch_size=12 does not divide over 8 parts \(2 processes x '
              r'config\.training\.grad_accum_steps=4 micro-batches\): the global batch is split over the ranks, '
              r'then into micro-batches\.$')
  with pytest.raises(ValueError, match=expected):
    distributed.check_divisible('training.batch_size', 12, 2 * 4, why, what=what)


def test_work_items_are_dealt_round_robin_to_exactly_one_rank():
  ranks = _ranks(3)
  for index in range(10):
    assert [distributed.is_mine(index, ctx) for ctx in ranks] == [r == index % 3 for r in range(3)]
  assert distributed.is_mine(7)  # one process does every item


def test_over_ranks_applies_fn_to_this_ranks_items_in_order():
  items = [(i, f'item{i}') for i in range(7)]
  results = {}
  for ctx in _ranks(3):
    calls = []

    def fn(index, item, calls=calls):
      calls.append(index)
      return item.upper()

    # The other ranks' items may be None (not converted): fn never sees them.
    mine_only = ((i, item if distributed.is_mine(i, ctx) else None) for i, item in items)
    # In one process the gather is the identity: a simulated rank yields its own results, in index order.
    results[ctx.rank] = list(distributed.over_ranks(mine_only, fn, ctx))
    assert calls == list(range(ctx.rank, 7, 3))
  assert results == {r: [(i, f'ITEM{i}') for i in range(r, 7, 3)] for r in range(3)}


def test_over_ranks_in_one_process_yields_each_result_before_the_next_item():
  drawn = []

  def items():
    for i in range(4):
      drawn.append(i)
      yield i, i

  for index, result in distributed.over_ranks(items(), lambda i, item: item * item):
    assert drawn[-1] == index and result == index * index
  assert drawn == [0, 1, 2, 3]


def test_on_main_rank_in_one_process_returns_or_raises_as_fn_does():
  assert distributed.on_main_rank(lambda: 42) == 42

  def fail():
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    distributed.on_main_rank(fail)


def test_mean_over_ranks_in_one_process_is_the_identity():
  terms = {'loss': torch.tensor(1.5), 'fp': torch.tensor(0.25)}
  assert distributed.mean_over_ranks(terms) is terms
