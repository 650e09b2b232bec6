"""Config validation and checkpoint I/O.

Config fields are validated where they are read, with the helpers below, so that every error message has
the same shape: the field, the value given, and what is allowed.

Checkpoints are Score SDE's: a `torch.save`d dict `{'optimizer', 'model', 'ema', 'step'}` of state dicts, so
Score SDE's released checkpoints load here and ours load in Score SDE. Unlike Score SDE, loading never runs
code from the file (`weights_only=True` with a minimal allow-list), is strict (Score SDE's `strict=False`
silently trains from random weights when keys do not fit), and saving is atomic.
"""

import contextlib
import hashlib
import logging
import math
import numbers
import os
import pathlib
import pickle
import re
import time
import uuid
import zipfile

import numpy as np
import torch


def check_choice(field, value, allowed):
  """Raises `ValueError` unless `value` is one of `allowed`.

  Args:
    field: the config field's dotted name, e.g. `'training.fp_wgt_type'`.
    value: the value the config holds.
    allowed: the allowed values.

  Returns:
    `value`, unchanged.
  """
  if not any(_same_choice(value, choice) for choice in allowed):
    raise ValueError(f'config.{field}={value!r} is not allowed; choose one of {tuple(allowed)!r}.')
  return value


def check_bool(field, value):
  """Raises `ValueError` unless `value` is a boolean (Python's or numpy's); returns it as a Python bool.

  Not `value in (True, False)`, which 1 and 0.0 pass.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'config.{field}={value!r} is not allowed; choose one of (True, False).')
  return bool(value)


def _same_choice(value, choice):
  # Python has 1 == True and 0.0 == False: a boolean field must hold a bool, and a number field not a bool.
  return isinstance(value, bool) == isinstance(choice, bool) and value == choice


def check_number(field, value, *, low=None, high=None, low_open=False, high_open=False, integer=False):
  """Raises `ValueError` unless `value` is a real (or integer) number in the given range.

  Args:
    field: the config field's dotted name.
    value: the value the config holds.
    low, high: bounds, `None` for unbounded.
    low_open, high_open: whether the bound itself is excluded.
    integer: whether the value must be an integer.

  Returns:
    `value`, unchanged.
  """
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ValueError(f'config.{field}={value!r} must be {"an integer" if integer else "a real number"}.')
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high or value != value:  # value != value catches NaN
    lo = '(' if low_open else '['
    hi = ')' if high_open else ']'
    interval = f'{lo}{"-inf" if low is None else low}, {"inf" if high is None else high}{hi}'
    raise ValueError(f'config.{field}={value!r} is out of range; allowed: {interval}.')
  return value


def expand_batch(coeff, x):
  """Reshapes a per-sample coefficient of shape (B,) to broadcast against x of shape (B, ...)."""
  return coeff.reshape(coeff.shape + (1,) * (x.dim() - coeff.dim()))


def batch_mul(coeff, x):
  """x scaled per sample by a coefficient of shape (B,)."""
  return expand_batch(coeff, x) * x


def sum_except_batch(x):
  """Sum over every dimension but the first: shape (B,)."""
  return x.reshape(x.shape[0], -1).sum(dim=1)


def data_dim(x):
  """Number of dimensions D of one sample of the batch x."""
  return math.prod(x.shape[1:])


def seed_for(*parts):
  """A seed (63-bit int) that is a fixed function of `parts` (ints and strings), the same in every process.

  For the generators whose draws must not depend on how work is split (over ranks, micro-batches or resumed
  runs): e.g. `seed_for(config.seed, 'train_step', step)`. Different parts give independent streams.
  """
  digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
  return int.from_bytes(digest[:8], 'little') >> 1


def at_least_float32(x):
  """x in float32, or in its own dtype if wider (float64 stays float64): undoes autocast's half precision."""
  return x.to(torch.promote_types(x.dtype, torch.float32))


# The four entries of a Score SDE checkpoint.
CHECKPOINT_KEYS = ('optimizer', 'model', 'ema', 'step')


class CheckpointError(RuntimeError):
  """A checkpoint file that cannot be loaded safely, or does not fit the state it is restored into."""


def checkpoint_safe_globals():
  """The globals, beyond torch's defaults, that Score SDE checkpoints need to unpickle.

  Score SDE's `optimization_manager` sets the learning rate to `lr * np.minimum(step / warmup, 1.0)`, a
  `numpy.float64`, so the optimizer's state dict pickles a numpy scalar: `numpy.core.multiarray.scalar` (its
  name under numpy 1.x, `numpy._core.multiarray.scalar` under numpy 2.x), called with a `numpy.dtype` whose
  unpickling builds an instance of the float64 dtype class (`numpy.dtypes.Float64DType` for numpy >= 1.25).
  Nothing else is allowed: any other global in a checkpoint makes `restore_checkpoint` refuse the file.

  Returns:
    A list for `torch.serialization.safe_globals`: objects and `(object, 'module.name')` pairs.
  """
  try:  # numpy 2.x, and numpy 1.26's forward-compatibility alias.
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
    has_numpy2_names = True
  except ImportError:
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
    has_numpy2_names = False
  scalar = multiarray.scalar
  allowed = [
      np.dtype,
      type(np.dtype(np.float64)),
      # Pin the name a checkpoint spells, whatever module this numpy defines the function in.
      (scalar, 'numpy.core.multiarray.scalar'),
  ]
  if has_numpy2_names:
    allowed.append((scalar, 'numpy._core.multiarray.scalar'))
  return allowed


# How a checkpoint file starts: a zip archive (torch.save since PyTorch 1.6), or PyTorch's legacy format, whose
# first pickle is a magic number.
_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.'


def _one_line(text, limit=300):
  """`text` on one line (whitespace collapsed), cut at `limit` characters: error messages stay one line."""
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _check_checkpoint_path(path):
  """Raises unless `path` is a non-empty regular file (FileNotFoundError if there is nothing at all)."""
  if path.is_symlink() and not path.exists():
    raise CheckpointError(f'Checkpoint {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not '
                          'exist.')
  if not path.exists():
    raise FileNotFoundError(f'Checkpoint {str(path)!r} does not exist.')
  if path.is_dir():
    raise CheckpointError(f'Checkpoint {str(path)!r} is a directory, not a checkpoint file.')
  if path.stat().st_size == 0:
    raise CheckpointError(f'Checkpoint {str(path)!r} is empty (0 bytes): a save that was killed before writing, '
                          'a full disk, or an incomplete copy.')


def _unreadable(path, error):
  """A one-line message saying why torch.load could not read `path`: truncated, corrupt, or not a checkpoint."""
  try:
    size = path.stat().st_size
    with open(path, 'rb') as f:
      head = f.read(len(_LEGACY_MAGIC))
  except OSError as e:
    return f'Checkpoint {str(path)!r} cannot be read: {e.strerror}.'
  if head.startswith(_ZIP_MAGIC):
    if not zipfile.is_zipfile(path):
      what = ('is truncated: a PyTorch zip archive without its end (central directory), as a save that was '
              'killed, a full disk or an incomplete copy leave it')
    else:
      what = 'is corrupt: a PyTorch zip archive whose contents cannot be read'
  elif head.startswith(_LEGACY_MAGIC):
    what = 'is truncated or corrupt: a legacy-format PyTorch file that cannot be read to its end'
  else:
    what = (f'is not a PyTorch checkpoint: neither a zip archive nor a legacy PyTorch file (it starts with '
            f'{head[:8]!r})')
  return f'Checkpoint {str(path)!r} {what} ({size} bytes; torch.load said: {_one_line(error, 160)}).'


def load_checkpoint_file(path, device='cpu'):
  """`torch.load`s a checkpoint without running code from it.

  The raw dict, unchecked against any model: for tools that read a checkpoint's step or weights.

  Raises:
    FileNotFoundError: nothing exists at `path`.
    CheckpointError: with a one-line message naming the file and the problem: a dangling symbolic link, a
      directory, an empty file, a truncated or corrupt file, a file that is not a PyTorch checkpoint, or one
      holding objects beyond a Score SDE checkpoint's (loading those could run code from the file).
  """
  path = pathlib.Path(path)
  _check_checkpoint_path(path)
  try:
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
      return torch.load(path, map_location=device, weights_only=True)
  except pickle.UnpicklingError as e:
    # Never retry with weights_only=False: that would execute whatever the file's pickle asks for.
    refused = re.search(r'GLOBAL \S+', str(e))
    if refused:
      raise CheckpointError(
          f'Refusing to load checkpoint {str(path)!r}: it holds objects outside the allow-list of a Score SDE '
          f'checkpoint (tensors, containers, numbers and numpy float64 scalars), and loading it could run code '
          f'from the file: torch.load refused {refused.group(0)}.') from e
    raise CheckpointError(_unreadable(path, e)) from e
  except (MemoryError, torch.cuda.OutOfMemoryError):
    raise
  except Exception as e:  # torch.load raises many kinds on a damaged file; each means "cannot be read"
    raise CheckpointError(_unreadable(path, e)) from e


def _model_mismatch(model_state, loaded_state):
  """Lists how a loaded model state dict differs from the model's: missing, unexpected and mismatched keys."""
  missing = [k for k in model_state if k not in loaded_state]
  unexpected = [k for k in loaded_state if k not in model_state]
  mismatched = [
      f'{k}: checkpoint {tuple(loaded_state[k].shape)} vs model {tuple(model_state[k].shape)}'
      for k in model_state
      if k in loaded_state and tuple(getattr(loaded_state[k], 'shape', ())) != tuple(model_state[k].shape)
  ]
  problems = []
  for name, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                     ('shape mismatches', mismatched)):
    if keys:
      problems.append(f'{len(keys)} {name}: {", ".join(keys)}')
  if missing and unexpected:
    # The usual cause: a checkpoint saved without nn.DataParallel restored into a wrapped model, or the reverse.
    ckpt_prefixed = all(k.startswith('module.') for k in loaded_state)
    model_prefixed = all(k.startswith('module.') for k in model_state)
    if ckpt_prefixed != model_prefixed:
      problems.append("(the checkpoint's keys and the model's differ in nn.DataParallel's 'module.' prefix)")
  return problems


def _entry_problems(loaded):
  """What is malformed in a loaded checkpoint's entries, beyond fitting a particular model (a list of strings).

  Checked so that `restore_checkpoint`'s `load_state_dict` calls cannot fail halfway, after the model has
  already been overwritten.
  """
  problems = []
  model = loaded['model']
  if not isinstance(model, dict):
    problems.append(f"entry 'model' is a {type(model).__name__}, not a state dict")
  else:
    not_tensors = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
      problems.append(f"entry 'model' has values that are not tensors: {', '.join(map(str, not_tensors))}")
  ema = loaded['ema']
  if not isinstance(ema, dict) or not {'decay', 'num_updates', 'shadow_params'} <= set(ema):
    problems.append("entry 'ema' is not a dict with 'decay', 'num_updates' and 'shadow_params'")
  else:
    decay, num_updates, shadow = ema['decay'], ema['num_updates'], ema['shadow_params']
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay <= 1:
      problems.append(f"'ema' decay is {decay!r}, not a number in [0, 1]")
    if num_updates is not None and (isinstance(num_updates, bool) or not isinstance(num_updates, numbers.Integral)):
      problems.append(f"'ema' num_updates is {num_updates!r}, not an integer or None")
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(x, torch.Tensor) for x in shadow):
      problems.append("'ema' shadow_params is not a list of tensors")
  optimizer = loaded['optimizer']
  groups = optimizer.get('param_groups') if isinstance(optimizer, dict) else None
  if (not isinstance(optimizer, dict) or not isinstance(optimizer.get('state'), dict)
      or not isinstance(groups, (list, tuple))
      or not all(isinstance(g, dict) and isinstance(g.get('params'), (list, tuple)) for g in groups)):
    problems.append("entry 'optimizer' is not an optimizer state dict ('state', and 'param_groups' with "
                    "'params')")
  step = loaded['step']
  if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
    problems.append(f"entry 'step' is {step!r}, not an integer >= 0")
  return problems


def _check_checkpoint(path, loaded, state):
  """Raises `CheckpointError` unless `loaded` fits `state`; checks everything before anything is changed."""
  if not isinstance(loaded, dict):
    raise CheckpointError(f'Checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a dict with entries '
                          f'{CHECKPOINT_KEYS}.')
  for key in CHECKPOINT_KEYS:
    if key not in loaded:
      raise CheckpointError(f'Checkpoint {str(path)!r} lacks the entry {key!r}; a checkpoint holds {CHECKPOINT_KEYS}.')
  problems = _entry_problems(loaded)
  if problems:
    raise CheckpointError(f'Checkpoint {str(path)!r} is malformed: ' + '; '.join(problems) + '.')

  model_state = state['model'].state_dict()
  problems = _model_mismatch(model_state, loaded['model'])
  if problems:
    raise CheckpointError(f'Checkpoint {str(path)!r} does not fit the model: ' + '; '.join(problems) + '.')

  # The EMA tracks the model's trainable parameters, in order (models/ema.py, as Score SDE).
  params = [p for p in state['model'].parameters() if p.requires_grad]
  shadow = loaded['ema']['shadow_params']
  if len(shadow) != len(params):
    raise CheckpointError(f"Checkpoint {str(path)!r}: 'ema' has {len(shadow)} shadow parameters, the model "
                          f'{len(params)} trainable parameters.')
  bad = [f'#{i}: checkpoint {tuple(s.shape)} vs model {tuple(p.shape)}'
         for i, (s, p) in enumerate(zip(shadow, params)) if tuple(s.shape) != tuple(p.shape)]
  if bad:
    raise CheckpointError(f"Checkpoint {str(path)!r}: 'ema' shadow parameters do not fit the model's: "
                          + ', '.join(bad) + '.')

  saved_groups = loaded['optimizer']['param_groups']
  groups = state['optimizer'].param_groups
  if [len(g['params']) for g in saved_groups] != [len(g['params']) for g in groups]:
    raise CheckpointError(f"Checkpoint {str(path)!r}: 'optimizer' has parameter groups of sizes "
                          f'{[len(g["params"]) for g in saved_groups]}, the optimizer '
                          f'{[len(g["params"]) for g in groups]}.')

  bad = non_finite_entries(loaded)
  if bad:
    shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    raise CheckpointError(f'Checkpoint {str(path)!r} holds non-finite values (NaN or inf) in {len(bad)} '
                          f'tensor(s): {shown}. Its weights diverged before it was saved; it can be neither '
                          'resumed from nor evaluated.')


def non_finite_entries(loaded):
  """The names of the floating-point tensors of a checkpoint dict that hold NaN or inf (model, EMA, optimizer)."""

  def bad(value):
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())

  names = [f'model {k}' for k, v in loaded['model'].items() if bad(v)]
  names += [f'ema shadow #{i}' for i, v in enumerate(loaded['ema']['shadow_params']) if bad(v)]
  for param_id, entries in loaded['optimizer']['state'].items():
    if isinstance(entries, dict):
      names += [f'optimizer state {param_id}.{name}' for name, v in entries.items() if bad(v)]
  return names


def restore_checkpoint(ckpt_dir, state, device):
  """Restores a Score SDE checkpoint into `state`, strictly and without running code from the file.

  Args:
    ckpt_dir: path of the checkpoint file (the name is Score SDE's).
    state: Score SDE's training state, `{'optimizer', 'model', 'ema', 'step'}`; updated in place.
    device: where the tensors are loaded (`map_location`).

  Returns:
    `state`. If the file does not exist, as in Score SDE, a warning is logged, the parent directory is
    created and `state` is returned unchanged (training starts from scratch).

  Raises:
    CheckpointError: with a one-line message naming the file: a dangling symbolic link, an empty, truncated or
      corrupt file, or one that is not a PyTorch checkpoint; a file holding anything beyond a Score SDE
      checkpoint's tensors, containers, numbers and numpy float64 scalars; an entry missing or malformed; the
      model's keys or shapes, the EMA's shadow parameters or the optimizer's parameter groups not fitting
      `state`; non-finite (NaN or inf) weights, EMA or optimizer state. `state` is unchanged then.
  """
  path = pathlib.Path(ckpt_dir)
  if not path.exists() and not path.is_symlink():  # a dangling link is an error (load_checkpoint_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.warning('No checkpoint found at %s. Returned the same state as input', ckpt_dir)
    return state
  loaded = load_checkpoint_file(path, device)
  _check_checkpoint(path, loaded, state)
  state['model'].load_state_dict(loaded['model'], strict=True)
  state['ema'].load_state_dict(loaded['ema'])
  state['optimizer'].load_state_dict(loaded['optimizer'])
  state['step'] = loaded['step']
  return state


def save_checkpoint(ckpt_dir, state):
  """Saves `state` in Score SDE's format, atomically: a crash mid-save leaves the previous file intact.

  The checkpoint is written with `atomic_write`: to a temporary file in the same directory, flushed to disk,
  then renamed over `ckpt_dir`.

  Args:
    ckpt_dir: path of the checkpoint file (the name is Score SDE's).
    state: Score SDE's training state, `{'optimizer', 'model', 'ema', 'step'}`.
  """
  saved_state = {
      'optimizer': state['optimizer'].state_dict(),
      'model': state['model'].state_dict(),
      'ema': state['ema'].state_dict(),
      'step': state['step'],
  }
  with atomic_write(ckpt_dir) as f:
    torch.save(saved_state, f)


@contextlib.contextmanager
def atomic_write(path):
  """Opens a binary file that replaces `path` only once the body has written it completely.

  The data go to a temporary file in the same directory, are flushed to disk, then renamed over `path`
  (`os.replace` is atomic on POSIX and Windows), and the directory is flushed too, so the new file survives a
  power loss: a crash or an error in the body leaves the previous file intact, and a reader polling the folder
  never sees half a file. An exception (KeyboardInterrupt included) removes the temporary file; a process
  killed outright (SIGKILL, power loss) cannot, and leaves `.<name>.<32 hex digits>.tmp` behind, which
  `remove_stale_temp_files` removes (training does at its next start). Parent directories are created.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    # O_EXCL: never write through a file someone else created; mode 0o666 lets the umask apply as for open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
    with os.fdopen(fd, 'wb') as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_directory(path.parent)


# The name of atomic_write's temporary files: `.<name>.<uuid4 hex>.tmp`.
_TEMP_NAME = re.compile(r'^\..+\.[0-9a-f]{32}\.tmp$')


def remove_stale_temp_files(directory, min_age_seconds=0.):
  """Removes the temporary files of `atomic_write`s whose process was killed mid-write, in `directory`.

  Only call it where no other process writes at the same time (training: under the workdir lock), or with a
  `min_age_seconds` longer than any write takes (a file being written has a fresh modification time).

  Returns:
    The list of `(path, size in bytes)` removed (logged as a warning).
  """
  removed = []
  try:
    names = os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return removed
  now = time.time()
  for name in names:
    if not _TEMP_NAME.match(name):
      continue
    path = os.path.join(directory, name)
    try:
      info = os.lstat(path)
      if now - info.st_mtime < min_age_seconds:
        continue
      os.unlink(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
      continue
    removed.append((path, info.st_size))
  if removed:
    logging.warning('Removed %d temporary file(s) left by a write that was killed: %s', len(removed),
                    ', '.join(f'{p} ({size} bytes)' for p, size in removed))
  return removed


def check_writable(directory, purpose):
  """Creates `directory` if needed and checks that files can be created in it.

  Args:
    directory: the directory.
    purpose: what is written there, for the message (e.g. 'the checkpoints').

  Raises:
    PermissionError (or another OSError): naming the directory and what it is for.
  """
  probe = os.path.join(directory, f'.write_test.{uuid.uuid4().hex}.tmp')
  try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise type(e)(e.errno, f'Cannot write into {directory!r} ({e.strerror}), the folder of {purpose}; fix it '
                           'or use another --workdir') from e


def _fsync_directory(directory):
  """Makes a rename in `directory` durable (POSIX); a no-op where directories cannot be opened."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _format_seconds(seconds):
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}'


class Progress:
  """Progress of a long loop: rate and ETA for log lines (the record), and a tqdm bar on an interactive
  terminal (never in a log file or a batch job's output)."""

  def __init__(self, total, desc, unit='it', done=0, show_bar=True):
    """Starts the clock.

    Args:
      total: the number of units of the whole loop, or None if unknown (no ETA then).
      desc: what the loop does (the bar's label).
      unit: the unit's name, e.g. 'step', 'batch'.
      done: units already done before this start (a resumed run's steps), not counted in the rate.
      show_bar: allow the tqdm bar (rank 0 only, under torchrun).
    """
    import sys  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    self._time = time.time
    self.total, self.unit, self.first = total, unit, done
    self.start = self._time()
    self.bar = None
    if show_bar and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, desc=desc, unit=unit, initial=done, leave=False, dynamic_ncols=True)

  def status(self, done):
    """'done/total unit, rate, ETA' at `done` units, and moves the bar there."""
    if self.bar is not None:
      self.bar.update(done - self.bar.n)
    elapsed = max(self._time() - self.start, 1e-9)
    rate = (done - self.first) / elapsed
    text = f'{done}/{self.total if self.total is not None else "?"} {self.unit}s, {rate:.3g} {self.unit}s/s'
    if self.total is not None and rate > 0:
      text += f', ETA {_format_seconds((self.total - done) / rate)}'
    return text

  def close(self):
    if self.bar is not None:
      self.bar.close()
