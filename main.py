"""Training and evaluation entry point (Score SDE's `main.py`, plus a mode that computes FID statistics).

  python main.py --config configs/fp/cifar10_ve_ncsnpp_continuous.py --workdir W --mode train
  python main.py --config ... --workdir W --mode eval [--eval_folder eval]
  python main.py --config ... --workdir W --mode fid_stats
  torchrun --standalone --nproc_per_node=N main.py --config ... --workdir W --mode train|eval|fid_stats

Config fields can be overridden on the command line, e.g. `--config.training.alpha=0.1`. Logs go to the console
and are appended to `W/stdout.txt`. Under torchrun (`distributed.py`), rank 0 alone writes the log file and logs
below WARNING; the other ranks log warnings and errors only, prefixed with their rank. See docs/workflow.md.
TensorFlow is never imported here: the data pipeline and the Inception network import it lazily and keep it
off the GPU.
"""

import logging
import os
import signal
import sys

from absl import app
from absl import flags
from ml_collections.config_flags import config_flags

import distributed
import preemption
import run_lib

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Training configuration.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory.')
flags.DEFINE_enum('mode', None, ['train', 'eval', 'fid_stats'],
                  'Running mode: train, eval, or fid_stats (compute the dataset statistics file for FID).')
flags.DEFINE_string('eval_folder', 'eval', 'The folder name for storing evaluation results')
flags.mark_flags_as_required(['workdir', 'config', 'mode'])

LOG_FORMAT = '%(levelname)s - %(filename)s - %(asctime)s - %(message)s'


def log_to_file(workdir):
  """Adds a handler that appends the root logger's records to `workdir/stdout.txt`, as Score SDE.

  Score SDE opens the file with 'w', which erases the log of the run being resumed; this appends.

  Returns:
    The handler (so that callers can remove it).
  """
  os.makedirs(workdir, exist_ok=True)
  handler = logging.FileHandler(os.path.join(workdir, 'stdout.txt'), mode='a')
  handler.setFormatter(logging.Formatter(LOG_FORMAT))
  logger = logging.getLogger()
  logger.addHandler(handler)
  logger.setLevel('INFO')
  return handler


def compute_fid_stats(config):
  """Computes the dataset statistics file FID is measured against (`evaluation.stats_path_from_config`).

  The file is `config.eval.stats_path`, or by default Score SDE's name under `assets/stats/`.
  """
  import datasets  # pylint: disable=g-import-not-at-top
  import evaluation  # pylint: disable=g-import-not-at-top
  path = evaluation.stats_path_from_config(config)
  logging.info('Computing dataset statistics for %s into %s.', config.data.dataset, path)
  datasets.compute_dataset_stats(config, path)
  logging.info('Wrote %s.', path)


def _quiet_other_ranks(rank):
  """On ranks other than 0: warnings and errors only, each line saying which rank it comes from."""
  logger = logging.getLogger()
  logger.setLevel('WARNING')
  for handler in logger.handlers:
    handler.setFormatter(logging.Formatter(f'[rank {rank}] {LOG_FORMAT}'))


def main(argv):
  del argv
  ctx = distributed.init_from_env(FLAGS.config.device)
  if ctx.distributed:
    # Each rank computes on its own device (cuda:LOCAL_RANK); the config must say so for models and samplers.
    FLAGS.config.device = ctx.device
  if ctx.is_main:
    # Evaluation creates no workdir: a mistyped --workdir is an error (run_lib.evaluate), not a new folder.
    if FLAGS.mode != 'eval' or os.path.isdir(FLAGS.workdir):
      log_to_file(FLAGS.workdir)
    logging.info('mode: %s, workdir: %s, config:\n%s', FLAGS.mode, FLAGS.workdir, FLAGS.config)
  else:
    _quiet_other_ranks(ctx.rank)
  try:
    if FLAGS.mode == 'train':
      run_lib.train(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      run_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.eval_folder)
    elif ctx.is_main:
      # The statistics of the data set are one pass of Inception over it: rank 0 alone.
      compute_fid_stats(FLAGS.config)
  except preemption.TrainingInterrupted as e:
    # Stopped by SIGTERM / SIGINT: an expected end, no traceback. EXIT_STOPPED after a clean stop (resume with
    # the same command), 128 + signal number after a second signal (as if killed).
    logging.warning('%s', e)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    # Ctrl-C outside training's loop (evaluation, statistics): one line, the shell's status for SIGINT.
    logging.warning('%s interrupted (Ctrl-C).', FLAGS.mode)
    sys.exit(128 + signal.SIGINT)
  except Exception:
    # Into stdout.txt as well as the console, so the log of a failed run says why it stopped.
    logging.exception('%s failed.', FLAGS.mode)
    raise
  finally:
    distributed.shutdown()


if __name__ == '__main__':
  app.run(main)
