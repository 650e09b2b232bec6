"""How a training run survives the ways jobs die: the workdir lock, and a clean stop on a signal.

Workdir lock. While `run_lib.train` runs, it holds `W/train.lock`, a small JSON file naming the process that
holds it (PID, host, process start time, command, a random token). The file is created atomically (written
in full under a temporary name, then hard-linked to its name, which fails if it exists), so a second trainer
on the same workdir is refused with an error naming the holder, instead of both writing checkpoints. A lock
left by a process that no longer runs (SIGKILL, a machine reboot) is detected on the same host (the PID is
gone, or belongs to a newer process) and taken over, with a warning; so is a lock that is a symbolic link to
nothing (a copied or restored workdir). A lock held from another host cannot be checked from here: the trainer
is refused and told to delete the file if that run is over, unless the lock records an earlier attempt of the
same torchrun run (same TORCHELASTIC_RUN_ID, another attempt id): torchrun stops every worker of an attempt
before it starts the next, so such a lock is stale wherever rank 0 ran. Under torchrun, rank 0 holds the lock.
Evaluation reads the lock to tell whether a trainer will still write the checkpoint it waits for (`trainer_status`).

Stop on a signal. `StopOnSignal` turns the first SIGTERM (what Slurm and Kubernetes send before a kill), SIGINT
(Ctrl-C) or SIGHUP (the terminal closed, an ssh session dropped) into a request that the training loop sees at
its next step boundary: it saves the resume point at that step and exits with `EXIT_STOPPED`. A process started
with SIGHUP ignored (`nohup`) keeps ignoring it: the user asked the run to outlive the terminal. A second
signal, a second or more after the first, raises `TrainingInterrupted` at once, without saving (a signal
repeated within that second is the same request delivered twice: torchrun forwards the terminal's Ctrl-C to
workers that received it already).
"""

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
import uuid

LOCK_NAME = 'train.lock'

# The exit status of a training run stopped by a stop signal after saving its resume point: EX_TEMPFAIL of
# sysexits.h ("a temporary failure; the user is invited to retry"): run the same command again to resume. A
# run killed outright exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP), as
# the shell reports it.
EXIT_STOPPED = 75

# The signals that stop training at the next step boundary with the resume point saved. SIGHUP does not exist
# on Windows.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if hasattr(signal, 'SIGHUP') else ())


class WorkdirLocked(RuntimeError):
  """Another trainer holds (or may hold) the workdir lock."""


class TrainingInterrupted(Exception):
  """Training stopped on a stop signal (`STOP_SIGNALS`).

  Attributes:
    signum: the signal's number.
    step: the step training stopped at (None if unknown).
    checkpoint: the resume point saved at `step`, or None if nothing was saved.
    exit_code: `EXIT_STOPPED` after a clean stop, 128 + signum after a second signal.
  """

  def __init__(self, message, signum, step=None, checkpoint=None, exit_code=None):
    super().__init__(message)
    self.signum = signum
    self.step = step
    self.checkpoint = checkpoint
    self.exit_code = exit_code if exit_code is not None else 128 + signum


def signal_name(signum):
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f'signal {signum}'


# ----------------------------------------------------------------------------------------------------------
# The workdir lock
# ----------------------------------------------------------------------------------------------------------


def process_start_time(pid):
  """When process `pid` started, in clock ticks since boot (Linux /proc), or None where this cannot be read.

  Stored in the lock with the PID: a PID that the system has given to a newer process since does not keep a
  dead trainer's lock alive.
  """
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      stat = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    return int(stat[stat.rindex(b')') + 2:].split()[19])  # field 22, starttime
  except (OSError, ValueError, IndexError):
    return None


@dataclasses.dataclass(frozen=True)
class Holder:
  """The process a lock file names."""
  pid: int
  host: str
  token: str
  start_time: int = None
  since: str = ''
  command: str = ''
  # The torchrun run and attempt of the holder (`distributed.elastic_attempt`), '' outside torchrun's agent.
  elastic_run: str = ''
  elastic_attempt: str = ''

  def describe(self):
    text = f'PID {self.pid} on host {self.host}'
    if self.since:
      text += f', since {self.since}'
    if self.command:
      text += f' ({self.command})'
    return text

  def alive(self):
    """True if the process runs, False if it does not, None if that cannot be told (another host)."""
    if self.host != socket.gethostname():
      return None
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      pass  # it exists (another user's process)
    except OSError:
      return None
    if self.start_time is not None:
      start_time = process_start_time(self.pid)
      if start_time is not None and start_time != self.start_time:
        return False  # the PID now belongs to a newer process
    return True


class Unreadable:
  """A lock file whose contents are not a lock record (another tool's file, or being written without link)."""

  def __init__(self, reason):
    self.reason = reason


def read_holder(path):
  """The `Holder` a lock file names; None if there is no lock file; an `Unreadable` if it is not a record."""
  try:
    # O_NONBLOCK: a FIFO planted as the lock would block the open until something writes into it.
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
  except FileNotFoundError:
    return None  # no lock, or a symbolic link to nothing (`WorkdirLock` takes that over)
  except OSError as e:
    return Unreadable(f'it cannot be read: {e.strerror}')
  with os.fdopen(fd, 'rb') as f:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      return Unreadable('it is not a regular file')
    try:
      data = f.read(65536)
    except OSError as e:
      return Unreadable(f'it cannot be read: {e.strerror}')
  try:
    record = json.loads(data.decode())
    return Holder(pid=int(record['pid']), host=str(record['host']), token=str(record['token']),
                  start_time=record.get('start_time'), since=str(record.get('since', '')),
                  command=str(record.get('command', '')), elastic_run=str(record.get('elastic_run', '')),
                  elastic_attempt=str(record.get('elastic_attempt', '')))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return Unreadable(f'it is not a lock record ({len(data)} bytes; {type(e).__name__})')


def trainer_status(workdir):
  """Whether a trainer runs on `workdir`, as its lock says.

  Returns:
    `(alive, description)`: alive is True (a live process holds the lock), False (no lock, or its process is
    gone) or None (the holder is on another host, or the file cannot be read: it cannot be told).
  """
  path = os.path.join(workdir, LOCK_NAME)
  holder = read_holder(path)
  if holder is None:
    return False, f'no trainer holds {path}'
  if isinstance(holder, Unreadable):
    return None, f'{path} exists but {holder.reason}'
  alive = holder.alive()
  if alive is None:
    return None, f'{path} is held by {holder.describe()}, another machine: whether it still runs cannot be checked'
  if alive:
    return True, f'{path} is held by {holder.describe()}, which is running'
  return False, f'{path} was left by {holder.describe()}, which no longer runs'


def _token(holder):
  """The token of a `read_holder` result, or None if it names no holder."""
  return holder.token if isinstance(holder, Holder) else None


def _own_record(elastic):
  run, attempt = elastic or ('', '')
  return {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'token': uuid.uuid4().hex,
      'start_time': process_start_time(os.getpid()),
      'since': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
      'command': ' '.join(sys.argv)[:500],
      'elastic_run': run,
      'elastic_attempt': attempt,
  }


class WorkdirLock:
  """`W/train.lock`, held by one trainer at a time (see the module docstring)."""

  def __init__(self, workdir, elastic=None):
    """`elastic`: `(TORCHELASTIC_RUN_ID, attempt id)` under torchrun's agent (`distributed.elastic_attempt`),
    recorded so that a later attempt of the same run may take over the lock from another host."""
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.elastic = elastic
    self.token = None
    self._created_workdir = False

  def acquire(self):
    """Takes the lock, creating the workdir if needed; returns self.

    Raises:
      WorkdirLocked: a live trainer holds it, or one on another host, or the file is not a lock record.
      PermissionError / OSError: the workdir cannot be created or written (the message names it).
    """
    if not os.path.isdir(self.workdir):
      try:
        os.makedirs(self.workdir)
      except FileExistsError as e:
        raise NotADirectoryError(f'The workdir {self.workdir!r} exists and is not a directory.') from e
      except OSError as e:
        raise type(e)(e.errno, f'Cannot create the workdir {self.workdir!r}: {e.strerror}') from e
      self._created_workdir = True
    record = _own_record(self.elastic)
    tmp = os.path.join(self.workdir, f'.{LOCK_NAME}.{uuid.uuid4().hex}.tmp')
    try:
      try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except OSError as e:
        raise type(e)(e.errno, f'The workdir {self.workdir!r} is not writable ({e.strerror}): training writes '
                               'its lock, checkpoints and logs there') from e
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
      # Three rounds: a stale lock taken over is followed by a fresh attempt; more rounds mean other
      # processes keep taking the lock.
      for _ in range(3):
        if self._link(tmp):
          self.token = record['token']
          logging.info('Holding the workdir lock %s (PID %d on host %s).', self.path, record['pid'],
                       record['host'])
          return self
        self._refuse_or_take_over()
      raise WorkdirLocked(f'Could not take the workdir lock {self.path}: other processes keep taking it.')
    except BaseException:
      self._forget_workdir()
      raise
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)

  def _link(self, tmp):
    """Puts the complete record in place under the lock's name, if there is no lock; returns whether it did."""
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError:
      pass  # a file system without hard links: create exclusively, then write
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f, open(tmp, 'rb') as src:
      f.write(src.read())
      f.flush()
      os.fsync(f.fileno())
    return True

  def _refuse_or_take_over(self):
    holder = read_holder(self.path)
    if holder is None:
      if os.path.islink(self.path):
        self._take_over_dangling_link()
      return  # released in the meantime (or taken over): try again
    if isinstance(holder, Unreadable):
      raise WorkdirLocked(f'The workdir lock {self.path} exists but {holder.reason}. If no trainer runs on this '
                          'workdir, delete the file and start again.')
    alive = holder.alive()
    if alive:
      raise WorkdirLocked(f'Another trainer runs on this workdir: {self.path} is held by {holder.describe()}. '
                          'Two trainers on one workdir overwrite each other\'s checkpoints; stop that one, or '
                          'use another --workdir.')
    if alive is None:
      if not self._earlier_attempt_of_this_run(holder):
        raise WorkdirLocked(f'The workdir lock {self.path} is held by {holder.describe()}, another machine: '
                            'whether that trainer still runs cannot be checked from here. If it has stopped, '
                            'delete the file and start again.')
      why = (f'an earlier attempt of this torchrun run (TORCHELASTIC_RUN_ID={holder.elastic_run}), whose workers '
             'torchrun stopped before it started this one')
    else:
      why = 'that process no longer runs (killed, or its machine restarted)'
    if self._remove_if(lambda moved: _token(read_holder(moved)) == holder.token):
      logging.warning('Took over the stale workdir lock %s left by %s: %s.', self.path, holder.describe(), why)

  def _earlier_attempt_of_this_run(self, holder):
    """Whether `holder` is a rank 0 of an earlier attempt of this process's torchrun run: same run id, another
    attempt (attempt ids are random per attempt, `distributed.attempt_store`)."""
    if not self.elastic or not holder.elastic_run or not holder.elastic_attempt:
      return False
    run, attempt = self.elastic
    return holder.elastic_run == run and holder.elastic_attempt != attempt

  def _take_over_dangling_link(self):
    """Removes the lock if it is a symbolic link to nothing: no process can hold it (a copied workdir)."""
    try:
      target = os.readlink(self.path)
    except OSError:
      return  # not a link (any more): try again
    if self._remove_if(lambda moved: os.path.islink(moved) and not os.path.exists(moved)):
      logging.warning('Took over the workdir lock %s, a symbolic link to %r, which does not exist: no trainer can '
                      'hold it, so it is treated as a stale lock.', self.path, target)

  def _remove_if(self, stale):
    """Removes the lock file if `stale(path)` holds for it once moved aside; returns whether it did.

    Moved first, then judged: another process may have taken the lock over between the caller's look and the
    move, and its lock is put back.
    """
    moved = os.path.join(self.workdir, f'.{LOCK_NAME}.stale.{uuid.uuid4().hex}.tmp')
    try:
      os.rename(self.path, moved)
    except FileNotFoundError:
      return False
    if not stale(moved):
      with contextlib.suppress(OSError):
        os.link(moved, self.path)
      with contextlib.suppress(FileNotFoundError):
        os.unlink(moved)
      return False
    os.unlink(moved)
    return True

  def check_held(self):
    """None while the lock file is still ours, else what happened to it (a sentence)."""
    holder = read_holder(self.path)
    if isinstance(holder, Holder) and holder.token == self.token:
      return None
    if holder is None:
      return f'the workdir lock {self.path} was deleted'
    if isinstance(holder, Unreadable):
      return f'the workdir lock {self.path} was replaced: {holder.reason}'
    return f'the workdir lock {self.path} is now held by {holder.describe()}'

  def release(self):
    """Removes the lock file if it is still ours (and the workdir, if `acquire` created it and it is empty)."""
    if self.token is not None:
      problem = self.check_held()
      if problem is None:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(self.path)
      else:
        logging.warning('Not removing the workdir lock: %s.', problem)
      self.token = None
    self._forget_workdir()

  def _forget_workdir(self):
    # A start that failed before writing anything leaves no trace: not even the workdir it created.
    if self._created_workdir:
      with contextlib.suppress(OSError):
        os.rmdir(self.workdir)
      self._created_workdir = False


# ----------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------


class StopOnSignal:
  """A context manager that turns the `STOP_SIGNALS` into a stop request (see the module docstring).

  While active, the first signal only sets `signum` (the handler does nothing else: it may run in the middle
  of any Python code, logging included); the training loop reads it at step boundaries. A second signal at
  least `repeat_seconds` after the first raises `TrainingInterrupted` from wherever the main thread is. The
  previous handlers are put back on exit. In a thread other than the main one, Python cannot install signal
  handlers: then nothing changes and signals act as before.
  """

  def __init__(self, repeat_seconds=1.):
    self.repeat_seconds = repeat_seconds
    self.signum = None
    self._first_time = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.info('Not in the main thread: SIGTERM / SIGINT / SIGHUP keep their default action (no save on a '
                   'signal).')
      return self
    for signum in STOP_SIGNALS:
      if signum == getattr(signal, 'SIGHUP', None) and signal.getsignal(signum) == signal.SIG_IGN:
        continue  # started under nohup: the terminal closing must not stop the run
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    now = time.monotonic()
    if self.signum is None:
      self.signum, self._first_time = signum, now
      return
    if now - self._first_time < self.repeat_seconds:
      return
    raise TrainingInterrupted(f'A second {signal_name(signum)} while stopping: exited at once, without saving.',
                              signum)

  @property
  def requested(self):
    """Whether a stop signal was received."""
    return self.signum is not None
