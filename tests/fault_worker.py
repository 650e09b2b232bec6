"""A training process for fault-injection tests (tests/test_faults.py, bench/fault_matrix.py): trains the tiny
2-D config of tests/configs_tiny.py, optionally with a fault injected at an exact moment, as main.py would
(same logging to W/stdout.txt, same exit codes).

  python tests/fault_worker.py W JSON_OVERRIDES [--kill_during_meta_save STEP] [--kill_during_snapshot_save STEP]
      [--kill_before_meta_save STEP] [--slow_stop_save SECONDS] [--nan_at STEP]

--kill_during_meta_save STEP: SIGKILL this process in the middle of writing the resume point of step STEP
  (after the snapshot of that step, half of the file written): the worst moment of a save.
--kill_during_snapshot_save STEP: the same, in the middle of writing the snapshot of step STEP.
--kill_before_meta_save STEP: SIGKILL after the snapshot of step STEP is written, before its resume point.
--slow_stop_save SECONDS: the save made on a stop signal takes that much longer (time to send a second signal).
--nan_at STEP: the update of step STEP makes every parameter NaN (its loss, computed before, is finite).
"""

import argparse
import json
import logging
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import checkpoints  # noqa: E402
import main  # noqa: E402
import preemption  # noqa: E402
import run_lib  # noqa: E402
from tests import torchrun_worker  # noqa: E402


def _inject(args):
  real_save = checkpoints.save_checkpoint

  def save_checkpoint(path, state):
    meta = os.path.basename(os.path.dirname(path)) == 'checkpoints-meta'
    step = int(state['step'])
    if meta and step == args.kill_before_meta_save:
      os.kill(os.getpid(), signal.SIGKILL)
    if step == (args.kill_during_meta_save if meta else args.kill_during_snapshot_save):
      real_torch_save = torch.save

      def half_then_kill(obj, f, *a, **k):
        real_torch_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

      torch.save = half_then_kill
    if meta and args.slow_stop_save and run_lib_stopping[0]:
      time.sleep(args.slow_stop_save)
    return real_save(path, state)

  run_lib_stopping = [False]
  real_stop = checkpoints.Checkpointer.save_resume_point

  def save_resume_point(self, state):
    run_lib_stopping[0] = True
    logging.warning('fault_worker: stopping on a signal at step %d', int(state['step']))
    return real_stop(self, state)

  checkpoints.save_checkpoint = save_checkpoint
  checkpoints.Checkpointer.save_resume_point = save_resume_point

  if args.nan_at is not None:
    import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    real_step = trainer_lib.Trainer.train_step

    def train_step(self, state, batch):
      terms = real_step(self, state, batch)
      if int(state['step']) == args.nan_at:
        with torch.no_grad():
          for p in state['model'].parameters():
            p.fill_(float('nan'))
      return terms

    trainer_lib.Trainer.train_step = train_step


def run():
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('overrides')
  parser.add_argument('--kill_during_meta_save', type=int, default=None)
  parser.add_argument('--kill_during_snapshot_save', type=int, default=None)
  parser.add_argument('--kill_before_meta_save', type=int, default=None)
  parser.add_argument('--nan_at', type=int, default=None)
  parser.add_argument('--slow_stop_save', type=float, default=0.)
  args = parser.parse_args()
  config = torchrun_worker.config_with(json.loads(args.overrides))
  logging.basicConfig(level=logging.INFO, format=main.LOG_FORMAT)
  main.log_to_file(args.workdir)
  _inject(args)
  try:
    run_lib.train(config, args.workdir)
  except preemption.TrainingInterrupted as e:
    sys.exit(e.exit_code)


if __name__ == '__main__':
  run()
