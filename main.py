"""Training and evaluation entry point (Score SDE's `main.py`, plus a mode that computes FID statistics).

  python main.py --config configs/fp/cifar10_ve_ncsnpp_continuous.py --workdir W --mode train
  python main.py --config ... --workdir W --mode eval [--eval_folder eval]
  python main.py --config ... --workdir W --mode fid_stats
  python main.py --config ... --workdir W --mode compare --baseline_workdir B [--ckpt K --baseline_ckpt KB]
  torchrun --standalone --nproc_per_node=N main.py --config ... --workdir W --mode train|eval|fid_stats

Config fields can be overridden on the command line, e.g. `--config.training.alpha=0.1`. Logs go to the console
and are appended to `W/stdout.txt`. A failure prints its message once, as one error line; its traceback goes
to `W/stdout.txt` only (and to the console with `--traceback`). A `--config` path that does not exist and an
override naming no field of the config (`--config.training.alpah=0.1`) are one line each, before anything runs.
Under torchrun (`distributed.py`), rank 0 alone writes the log file and logs
below WARNING; the other ranks log warnings and errors only, prefixed with their rank. See docs/workflow.md.
TensorFlow is never imported here: the data pipeline and the Inception network import it lazily and keep it
off the GPU.
"""

import difflib
import logging
import math
import os
import signal
import sys

from absl import app
from absl import flags
from ml_collections.config_flags import config_flags

import compare
import distributed
import preemption
import run_lib
import utils

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Training configuration.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory.')
flags.DEFINE_enum('mode', None, ['train', 'eval', 'fid_stats', 'compare'],
                  'Running mode: train, eval, fid_stats (compute the dataset statistics file for FID), or compare '
                  '(the evaluation results of --workdir against those of --baseline_workdir).')
flags.DEFINE_string('eval_folder', 'eval', 'The folder name for storing evaluation results')
flags.DEFINE_bool('allow_outside_workdir', False, 'Allow --eval_folder to resolve outside --workdir (an absolute '
                  'path, \'..\', or a symbolic link): results are written there.')
flags.DEFINE_string('baseline_workdir', None, '--mode compare: the baseline\'s work directory (its <eval_folder> '
                    'holds the evaluation results compared against those of --workdir).')
flags.DEFINE_integer('ckpt', None, '--mode compare: the checkpoint of --workdir to compare (default: the last '
                     'one evaluated).')
flags.DEFINE_integer('baseline_ckpt', None, '--mode compare: the checkpoint of --baseline_workdir to compare '
                     '(default: the last one evaluated).')
flags.DEFINE_bool('traceback', False, 'On failure, print the traceback on the console too (it is always '
                  'written to W/stdout.txt when that log exists).')
flags.mark_flags_as_required(['workdir', 'config', 'mode'])
flags.register_validator('baseline_workdir', lambda value: value is None or bool(value),
                         message='--baseline_workdir is empty.')
flags.register_multi_flags_validator(
    ['mode', 'baseline_workdir'], lambda f: f['mode'] != 'compare' or f['baseline_workdir'] is not None,
    message='--mode=compare needs --baseline_workdir: the workdir of the baseline, evaluated like --workdir.')

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


class ConfigArgumentError(Exception):
  """A `--config` argument that cannot be used: the file does not exist, or an override names no field."""


def config_argument(argv):
  """The value of `--config` in `argv` (`--config=X` or `--config X`), or None if absent."""
  for i, arg in enumerate(argv):
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
  return None


def override_fields(argv):
  """The field paths of the `--config.X.Y=V` overrides in `argv` (`X.Y`), in order."""
  fields = []
  for arg in argv:
    for prefix in ('--config.', '-config.', '--noconfig.', '-noconfig.'):
      if arg.startswith(prefix):
        fields.append(arg[len(prefix):].split('=', 1)[0])
  return fields


def check_config_file(path):
  """Raises ConfigArgumentError naming the file if the `--config` value `path` (`FILE[:ARG]`) names none."""
  file = path.split(':', 1)[0]
  if not os.path.isfile(file):
    where = '' if os.path.isabs(file) else f' (relative to the current directory {os.getcwd()})'
    raise ConfigArgumentError(f'--config={path}: the config file {file!r} does not exist{where}.')


def missing_field_message(config, field, config_path):
  """The one-line message for an override `field` ('training.alpah') that `config` lacks, or None if it has it.

  It names the first missing part of the path and up to three names of the same level nearest to it (difflib),
  in place of ml_collections' chained KeyError / AttributeError.
  """
  holder, parts = config, field.split('.')
  for depth, name in enumerate(parts):
    keys = list(holder.keys()) if hasattr(holder, 'keys') else []
    if name not in keys:
      prefix = '.'.join(parts[:depth])
      full = [f'{prefix}.{k}' if prefix else k for k in keys]
      nearest = [f'{prefix}.{k}' if prefix else k for k in difflib.get_close_matches(name, keys, n=3, cutoff=0.5)]
      hint = f'nearest: {", ".join(nearest)}' if nearest else f'the fields there: {", ".join(sorted(full))}'
      where = f'config.{prefix}' if prefix else 'the config'
      return f'--config.{field}: {where} ({config_path}) has no field {name!r}; {hint}.'
    holder = holder[name]
  return None


def parse_flags(argv):
  """absl's flag parsing (`app.run`'s `flags_parser`), with `--config` errors as one line each.

  ml_collections reports a missing config file as a chained OSError when the config is first read, and an
  override of a field that does not exist as three chained exceptions; both become a ConfigArgumentError line
  here. Other flag errors keep absl's own one-line report.
  """
  path = config_argument(argv[1:])
  try:
    if path is not None:
      check_config_file(path)
    try:
      return FLAGS(argv)
    except (KeyError, AttributeError) as error:
      config = FLAGS['config'].parser.parse(path) if path is not None else None
      for field in override_fields(argv[1:]) if config is not None else []:
        message = missing_field_message(config, field, path)
        if message:
          raise ConfigArgumentError(message) from error
      raise
  except (ConfigArgumentError, flags.Error) as error:
    # As absl's parse_flags_with_usage reports a flag error: one line and the help hint, status 1.
    sys.stderr.write(f'FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)


def _one_line(error):
  """`Type: message`, for the failure's line on the console."""
  return f'{type(error).__name__}: {error}'


def report_failure(mode, file_handler, show_traceback):
  """Logs the exception being handled once: its message as one error record, its traceback in the log file.

  Absl's re-raise would print the traceback a second time after `logging.exception`'s; instead the console
  gets the message (and the traceback with `--traceback`), and `W/stdout.txt` the message and the traceback.
  """
  error = sys.exc_info()[1]
  if show_traceback:
    logging.exception('%s failed: %s', mode, _one_line(error))
    return
  where = f' (traceback in {file_handler.baseFilename}; --traceback prints it here)' if file_handler else (
      ' (--traceback prints its traceback)')
  logging.error('%s failed: %s%s', mode, _one_line(error), where)
  if file_handler is not None:
    record = logging.LogRecord(logging.getLogger().name, logging.ERROR, __file__, 0, 'Traceback of the failure:',
                               None, sys.exc_info())
    file_handler.handle(record)


def run_compare(config):
  """--mode compare: the evaluation results of --workdir against those of --baseline_workdir (compare.py)."""
  run_lib.eval_dir_in(FLAGS.workdir, FLAGS.eval_folder, FLAGS.allow_outside_workdir)  # the table is written there
  text = compare.compare_workdirs(config, FLAGS.workdir, FLAGS.baseline_workdir, FLAGS.eval_folder,
                                  ckpt=FLAGS.ckpt, baseline_ckpt=FLAGS.baseline_ckpt)
  logging.info('Comparison:\n%s', text)


def dist_timeout_seconds(config):
  """`training.dist_timeout_seconds`, validated: how long a rank waits for the others in a collective."""
  return utils.check_number('training.dist_timeout_seconds', config.training.dist_timeout_seconds, low=0,
                            low_open=True, high=math.inf, high_open=True)


def main(argv):
  del argv
  try:
    ctx = distributed.init_from_env(FLAGS.config.device, timeout_seconds=dist_timeout_seconds(FLAGS.config))
  except (ValueError, RuntimeError) as error:
    # Before the log file exists: one line on the console, as the failures below.
    logging.error('%s failed: %s', FLAGS.mode, _one_line(error))
    sys.exit(1)
  if ctx.distributed:
    # Each rank computes on its own device (cuda:LOCAL_RANK); the config must say so for models and samplers.
    FLAGS.config.device = ctx.device
  file_handler = None
  if ctx.is_main:
    # Evaluation and comparison create no workdir: a mistyped --workdir is an error, not a new folder.
    if FLAGS.mode not in ('eval', 'compare') or os.path.isdir(FLAGS.workdir):
      file_handler = log_to_file(FLAGS.workdir)
    logging.info('mode: %s, workdir: %s, config:\n%s', FLAGS.mode, FLAGS.workdir, FLAGS.config)
  else:
    _quiet_other_ranks(ctx.rank)
  try:
    if FLAGS.mode == 'train':
      run_lib.train(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      run_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.eval_folder, FLAGS.allow_outside_workdir)
    elif ctx.is_main and FLAGS.mode == 'compare':
      run_compare(FLAGS.config)
    elif ctx.is_main:
      # The statistics of the data set are one pass of Inception over it: rank 0 alone.
      compute_fid_stats(FLAGS.config)
  except preemption.TrainingInterrupted as e:
    # Stopped by SIGTERM / SIGINT / SIGHUP: an expected end, no traceback. EXIT_STOPPED after a clean stop (resume
    # with the same command), 128 + signal number after a second signal (as if killed).
    logging.warning('%s', e)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    # Ctrl-C outside training's loop (evaluation, statistics): one line, the shell's status for SIGINT.
    logging.warning('%s interrupted (Ctrl-C).', FLAGS.mode)
    sys.exit(128 + signal.SIGINT)
  except Exception:  # pylint: disable=broad-except
    # Into stdout.txt as well as the console, so the log of a failed run says why it stopped.
    report_failure(FLAGS.mode, file_handler, FLAGS.traceback)
    sys.exit(1)
  finally:
    distributed.shutdown()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
