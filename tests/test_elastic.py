"""Elastic runs under torchrun: restarts after a worker dies, a dead peer, two agents joined by a c10d rendezvous.

The restarts failed before because torchrun's agent keeps one store for every attempt, so the restarted workers
read the addresses of the dead ones (`distributed.attempt_store`). The longer loop of kills is
`bench/elastic_kill_loop.py` (its result is in docs/workflow.md).
"""

import datetime
import os
import re
import socket
import subprocess
import sys
import threading
import time

import ml_collections
import pytest
import torch.distributed as dist

import distributed
import main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
from elastic_kill_loop import free_port, worker_env  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'configs_tiny.py')
QUICK = ['--config.training.snapshot_sampling=False', '--config.training.eval_freq=1000000', '--config.optim.warmup=0',
         '--config.training.log_freq=1']


def _attempt(world_size):
  """`attempt_store` on every rank of one attempt (threads); returns the stores, each after its rank set a key."""
  stores, attempts, errors = [None] * world_size, [None] * world_size, []

  def rank(r):
    try:
      stores[r], attempts[r] = distributed.attempt_store(r, world_size, datetime.timedelta(seconds=30))
      stores[r].set(f'from_rank_{r}', str(r))
    except Exception as e:  # pylint: disable=broad-except  (reported by the assertion below)
      errors.append(e)

  threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not errors and all(stores), errors
  assert len(set(attempts)) == 1 and attempts[0]  # one id, shared by every rank of the attempt
  return stores


def _agent_store(monkeypatch):
  port = free_port()
  monkeypatch.setenv('MASTER_ADDR', 'localhost')
  monkeypatch.setenv('MASTER_PORT', str(port))
  return dist.TCPStore('localhost', port, is_master=True, wait_for_workers=False)


def test_each_attempt_meets_under_a_fresh_prefix_of_the_agents_store(monkeypatch):
  server = _agent_store(monkeypatch)
  first = _attempt(3)
  first[0].set('only_in_the_first_attempt', 'x')
  # A worker killed before rank 0 answered leaves its hello behind: the next attempt is not misled by it.
  server.queue_push(f'{distributed.ATTEMPT_KEYS}/hello', 'a-dead-workers-id')
  second = _attempt(3)
  # Within an attempt every rank sees the others' keys; the next attempt sees none of the first's (stale keys
  # made gloo connect to dead workers).
  assert all(s.get('from_rank_2') == b'2' for s in first + second)
  assert not any(s.check(['only_in_the_first_attempt']) for s in second)
  assert len([k for k in server.list_keys() if k.endswith('from_rank_1')]) == 2


def testattempt_store_names_the_ranks_that_did_not_join(monkeypatch):
  server = _agent_store(monkeypatch)
  with pytest.raises(distributed.RankLost, match=r'Only 0 of the 2 other ranks joined within 0.5 s'):
    distributed.attempt_store(0, 3, datetime.timedelta(seconds=0.5))
  del server


def test_lost_rank_message_names_a_local_rank_whose_process_ended():
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  peers = ((socket.gethostname(), os.getpid()), (socket.gethostname(), dead.pid))
  error = RuntimeError('[/x/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:26004. This is '
                       'typically caused by a remote worker crashing.')
  text = distributed.lost_rank_message('the gradient all_reduce', error, peers)
  assert re.fullmatch(rf'the gradient all_reduce failed on rank 0: rank 1 \(PID {dead.pid} on host .*\) ended '
                      r'\(killed or crashed\)\. Every rank stops; .* Backend: Connection closed by peer '
                      r'\[127\.0\.0\.1\]:26004', text), text
  # A remote rank cannot be checked: the message says which hosts.
  peers = ((socket.gethostname(), os.getpid()), ('node7', 123))
  assert 'ranks on node7 cannot be checked from here' in distributed.lost_rank_message('barrier', error, peers)


@pytest.mark.parametrize('value', [0, -1., float('nan'), float('inf'), '60', True])
def test_dist_timeout_is_a_positive_finite_number(value):
  config = ml_collections.ConfigDict({'training': {'dist_timeout_seconds': value}})
  with pytest.raises(ValueError, match=r'config\.training\.dist_timeout_seconds='):
    main.dist_timeout_seconds(config)


def _log(workdir):
  with open(os.path.join(workdir, 'stdout.txt')) as f:
    return f.read()


def test_two_torchrun_agents_joined_by_a_c10d_rendezvous_train_to_the_end(tmp_path):
  workdir = str(tmp_path / 'w')
  rdzv = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
          f'--rdzv-endpoint=localhost:{free_port()}', f'--rdzv-id=test-{os.getpid()}']
  train = ['main.py', f'--config={TINY}:toy', f'--workdir={workdir}', '--mode=train', *QUICK,
           '--config.training.n_iters=6', '--config.training.snapshot_freq=3']
  agents = [subprocess.Popen([*rdzv, *train], cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
  outputs = [agent.communicate(timeout=120)[0] for agent in agents]
  assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  log = _log(workdir)
  # Rank 0 alone writes: one log line per step, one event file, every snapshot.
  assert log.count('mode: train') == 1 and 'Training finished at step 6.' in log
  assert [log.count(f'step: {s}, training_loss') for s in range(1, 7)] == [1] * 6
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == 1
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['checkpoint_1.pth', 'checkpoint_2.pth']
  assert not os.path.exists(os.path.join(workdir, 'train.lock'))


def test_a_dead_peer_stops_the_other_rank_at_once_with_a_line_naming_it(tmp_path):
  workdir = str(tmp_path / 'w')
  cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--max-restarts=0',
         'main.py', f'--config={TINY}:toy', f'--workdir={workdir}', '--mode=train', *QUICK,
         '--config.training.n_iters=1000000', '--config.training.snapshot_freq=1000000',
         '--config.training.snapshot_freq_for_preemption=1000000', '--config.training.dist_timeout_seconds=600']
  agent = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
  try:
    start = time.monotonic()
    while 'step: 5, training_loss' not in (_log(workdir) if os.path.exists(os.path.join(workdir, 'stdout.txt'))
                                           else ''):
      assert time.monotonic() - start < 120 and agent.poll() is None
      time.sleep(0.1)
    children = open(f'/proc/{agent.pid}/task/{agent.pid}/children').read().split()
    rank1 = [int(p) for p in children if b'RANK=1' in open(f'/proc/{p}/environ', 'rb').read().split(b'\0')]
    os.kill(rank1[0], 9)
    killed = time.monotonic()
    output = agent.communicate(timeout=120)[0]
  finally:
    if agent.poll() is None:
      os.killpg(agent.pid, 9)
  # Rank 0 noticed within seconds, not after the 600 s timeout, and said which rank ended, on one line.
  assert time.monotonic() - killed < 60
  line = re.search(r'train failed: RankLost: (.*)', _log(workdir))
  assert line, _log(workdir)[-3000:] + output[-3000:]
  assert re.match(rf'.* failed on rank 0: rank 1 \(PID {rank1[0]} on host .*\) ended \(killed or crashed\)',
                  line.group(1)), line.group(1)


def test_killed_workers_restart_and_finish_with_every_snapshot():
  # Two SIGKILLs of random workers at random steps of one torchrun --max-restarts=2 run (the 2-D config).
  proc = subprocess.run([sys.executable, 'bench/elastic_kill_loop.py', '--kills', '2', '--config', 'toy', '--seed',
                         '1', '--run_timeout', '150'], cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                        timeout=200)
  assert proc.returncode == 0 and '1/1 runs finished' in proc.stdout, proc.stdout + proc.stderr[-3000:]
