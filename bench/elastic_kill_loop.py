"""The kill loop: SIGKILL torchrun workers at random steps and check that the elastic restarts finish the run.

  python bench/elastic_kill_loop.py --kills 12                     # 12 kills, 2 per run (about 10 min on 2 CPUs)
  python bench/elastic_kill_loop.py --kills 4 --config toy         # the quick 2-D config
  python bench/elastic_kill_loop.py --kills 2 --nnodes 2           # two torchrun agents, c10d rendezvous

Each run trains a tiny config (`tests/configs_tiny.py`: NCSN++ VE on 8x8 images with the score-FPE regularizer
on, or the 2-D `toy` one) under `torchrun --max-restarts=K` on the CPU (gloo), 2 processes, on one node (one
agent, `--standalone`) or on two "nodes" (two agents on this host joined by a c10d rendezvous, one process each).
While it runs, K times: wait until the attempt running has logged a random step between its resume point and
`n_iters`, wait a random fraction of a step more (so that kills land in the step, in the all-reduce or in a
save), and SIGKILL one worker at random. A run *finished* when every agent exited 0, the log says `Training
finished at step n_iters`, every numbered snapshot `checkpoint_1 .. checkpoint_{n_iters // snapshot_freq}`
loads, the resume point is at `n_iters`, and no temporary file and no lock file are left. A run that outlives
`--run_timeout` is a hang: its agents and workers are killed. Prints one row per run and the totals; exits 1
unless every run finished.
"""

import argparse
import glob
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import checkpoints  # noqa: E402

TINY = os.path.join(ROOT, 'tests', 'configs_tiny.py')
SCHEDULE = {'training.snapshot_sampling': False, 'training.eval_freq': 10 ** 6, 'training.log_freq': 1,
            'optim.warmup': 0}
CONFIGS = {
    # The setting: about 3 steps/s on 2 busy CPU cores, so a kill lands in a chosen step.
    'image': dict(SCHEDULE, **{'training.n_iters': 40, 'training.snapshot_freq': 8,
                               'training.snapshot_freq_for_preemption': 2}),
    # About 30 steps/s: the kill lands a few steps after the chosen one.
    'toy': dict(SCHEDULE, **{'training.n_iters': 120, 'training.snapshot_freq': 20,
                             'training.snapshot_freq_for_preemption': 5}),
}


def worker_env():
  """The environment of the launched processes: CPU only, one thread each, the repository importable."""
  return dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2', OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def free_port():
  """A TCP port free on localhost now (for a rendezvous endpoint)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _config_flags(kind, tmp):
  overrides = dict(CONFIGS[kind])
  if kind == 'image':
    path = os.path.join(tmp, 'images.npz')
    if not os.path.exists(path):
      rng = np.random.default_rng(0)
      np.savez(path, train=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
               test=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    overrides['data.path'] = path
    config = TINY
  else:
    config = f'{TINY}:toy'
  return [f'--config={config}', *(f'--config.{k}={v}' for k, v in overrides.items())]


def _start(workdir, args, tmp):
  """The torchrun agents of one run, each in a session of its own (its workers join its process group)."""
  train = ['main.py', f'--workdir={workdir}', '--mode=train', *_config_flags(args.config, tmp)]
  launcher = [sys.executable, '-m', 'torch.distributed.run', f'--max-restarts={args.kills_per_run}']
  if args.nnodes == 1:
    commands = [[*launcher, '--standalone', '--nproc_per_node=2', *train]]
  else:
    rdzv = [f'--nnodes={args.nnodes}', '--nproc_per_node=1', '--rdzv-backend=c10d',
            f'--rdzv-endpoint=localhost:{free_port()}', f'--rdzv-id=kill-loop-{os.getpid()}-{time.time_ns()}']
    commands = [[*launcher, *rdzv, *train] for _ in range(args.nnodes)]
  logs = [open(os.path.join(tmp, f'agent{i}.txt'), 'w') for i in range(len(commands))]
  return [subprocess.Popen(c, cwd=ROOT, env=worker_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
          for c, f in zip(commands, logs)]


def _workers(agents):
  """The worker processes of the agents: (pid, rank) pairs."""
  found = []
  for agent in agents:
    for path in glob.glob(f'/proc/{agent.pid}/task/*/children'):
      try:
        pids = open(path).read().split()
      except OSError:
        continue
      for pid in pids:
        try:
          environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
        except OSError:
          continue
        rank = [e[5:].decode() for e in environ if e.startswith(b'RANK=')]
        if rank:
          found.append((int(pid), int(rank[0])))
  return found


def _log(workdir):
  try:
    with open(os.path.join(workdir, 'stdout.txt')) as f:
      return f.read()
  except FileNotFoundError:
    return ''


def _attempts(log):
  """The resume step of every attempt that reached the training loop, in order."""
  return [int(s) for s in re.findall(r'Starting training loop at step (\d+)', log)]


def _last_step(log):
  steps = re.findall(r'step: (\d+), training_loss', log.rsplit('Starting training loop', 1)[-1])
  return int(steps[-1]) if steps else None


def _wait(predicate, agents, deadline):
  while time.monotonic() < deadline:
    if predicate():
      return True
    if all(a.poll() is not None for a in agents):
      return False
    time.sleep(0.05)
  return False


def _stop(agents):
  # torchrun starts each worker in a process group of its own: a hung run's workers are killed one by one.
  for pid, _ in _workers(agents):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  for agent in agents:
    try:
      os.killpg(agent.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    agent.wait()


def _last_errors(tmp, num_agents):
  """The last error line of each agent's output (where a failed restart says why)."""
  lines = []
  for i in range(num_agents):
    with open(os.path.join(tmp, f'agent{i}.txt'), errors='replace') as f:
      errors = [line.strip() for line in f if re.search(r'Error|failed|Timeout', line)]
    if errors:
      lines.append(f'agent {i}: {errors[-1][:300]}')
  return lines


def check_finished(workdir, n_iters, snapshot_freq):
  """Problems with a run that should have finished (an empty list: every snapshot, nothing left over)."""
  problems = []
  log = _log(workdir)
  # A kill after the last step's save: the restart finds the resume point at n_iters and has nothing to train.
  if f'Training finished at step {n_iters}.' not in log and f'The checkpoint is at step {n_iters},' not in log:
    problems.append(f'neither "Training finished at step {n_iters}" nor "The checkpoint is at step {n_iters}" in '
                    'the log')
  for k in range(1, n_iters // snapshot_freq + 1):
    path = os.path.join(workdir, 'checkpoints', f'checkpoint_{k}.pth')
    try:
      checkpoints.load_checkpoint_file(path)
    except Exception as e:  # pylint: disable=broad-except  (any failure is a finding to report)
      problems.append(f'snapshot {k}: {type(e).__name__}: {str(e)[:120]}')
  try:
    step = int(checkpoints.load_checkpoint_file(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth'))['step'])
    if step != n_iters:
      problems.append(f'resume point at step {step}')
  except Exception as e:  # pylint: disable=broad-except
    problems.append(f'resume point: {type(e).__name__}')
  left = [os.path.relpath(os.path.join(d, f), workdir) for d, _, names in os.walk(workdir) for f in names
          if f.endswith('.tmp') or f == 'train.lock']
  if left:
    problems.append(f'left over: {", ".join(sorted(left))}')
  return problems


def run_once(workdir, args, rng, tmp):
  """One torchrun run with `args.kills_per_run` kills; returns (finished, kills made, a description)."""
  overrides = CONFIGS[args.config]
  n_iters, snapshot_freq = overrides['training.n_iters'], overrides['training.snapshot_freq']
  agents = _start(workdir, args, tmp)
  deadline = time.monotonic() + args.run_timeout
  kills = []
  try:
    for k in range(args.kills_per_run):
      # The attempt after the k kills so far has reached its loop: kill it at a random step after its resume.
      if not _wait(lambda k=k: len(_attempts(_log(workdir))) > k, agents, deadline):
        break
      resume = _attempts(_log(workdir))[k]
      # In the first three quarters of what is left: the kill lands a few steps later (polling, the random delay).
      target = rng.randint(resume + 1, max(resume + 1, resume + (n_iters - resume) * 3 // 4))
      if not _wait(lambda: (_last_step(_log(workdir)) or 0) >= target, agents, deadline):
        break
      time.sleep(rng.uniform(0., 0.3))
      workers = _workers(agents)
      if not workers:
        break
      pid, rank = rng.choice(workers)
      os.kill(pid, signal.SIGKILL)
      kills.append(f'rank {rank} at step {_last_step(_log(workdir))}')
    for agent in agents:
      agent.wait(timeout=max(1., deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    return False, kills, f'HANG: still running after {args.run_timeout:g} s'
  finally:
    _stop(agents)
  codes = [a.returncode for a in agents]
  problems = [] if codes == [0] * len(agents) else [f'torchrun exit status {codes}']
  problems += check_finished(workdir, n_iters, snapshot_freq)
  if len(kills) < args.kills_per_run:
    problems.append(f'only {len(kills)} kill(s): the run ended first')
  if codes != [0] * len(agents):
    problems += _last_errors(tmp, len(agents))
  return not problems, kills, '; '.join(problems) or f'finished at step {n_iters}'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kills', type=int, default=12, help='SIGKILLs in all')
  parser.add_argument('--kills_per_run', type=int, default=2, help='SIGKILLs per run (its --max-restarts)')
  parser.add_argument('--config', choices=sorted(CONFIGS), default='image')
  parser.add_argument('--nnodes', type=int, default=1, help='1: one agent, 2 processes; 2: two agents, 1 each')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--run_timeout', type=float, default=300., help='seconds before a run counts as a hang')
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  runs = max(1, -(-args.kills // args.kills_per_run))
  finished = 0
  print(f'| run | kills | result |\n| --- | --- | --- |', flush=True)
  with tempfile.TemporaryDirectory(prefix='kill_loop_') as tmp:
    for i in range(runs):
      start = time.monotonic()
      ok, kills, text = run_once(os.path.join(tmp, f'w{i}'), args, rng, tmp)
      finished += ok
      print(f'| {i + 1} | {", ".join(kills) or "none"} | {"ok" if ok else "FAILED"}: {text} '
            f'({time.monotonic() - start:.0f} s) |', flush=True)
  print(f'{finished}/{runs} runs finished with every numbered snapshot and no temporary file '
        f'({runs * args.kills_per_run} kills planned, {args.config} config, {args.nnodes} node(s)).')
  return 0 if finished == runs else 1


if __name__ == '__main__':
  sys.exit(main())
