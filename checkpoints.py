"""Checkpoints: Score SDE's file format, durable writes, and the training run's save policy.

Files. Checkpoints are Score SDE's: a `torch.save`d dict `{'optimizer', 'model', 'ema', 'step'}` of state
dicts, so Score SDE's released checkpoints load here and ours load in Score SDE. Unlike Score SDE, loading
never runs code from the file (`weights_only=True` with a minimal allow-list), is strict (Score SDE's
`strict=False` silently trains from random weights when keys do not fit), and saving is atomic
(`atomic_write`, which every result file of the project also uses). Score SDE's `restore_checkpoint` and
`save_checkpoint` are importable from `utils` too.

Save policy. `Checkpointer` owns a training run's checkpoints in its workdir: the resume point
(`checkpoints-meta/checkpoint.pth`) and the step it holds, the numbered snapshots and when they are due, and
the checks that keep a bad state off disk (a non-finite loss or gradient since the last check, non-finite or
exploded weights, a lost workdir lock). Evaluation waits for snapshots with `await_checkpoint`.

This module sits below `run_lib` and `utils`; it imports only `distributed` and `preemption` of the project.
"""

import contextlib
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

import distributed
import preemption

# The four entries of a Score SDE checkpoint.
CHECKPOINT_KEYS = ('optimizer', 'model', 'ema', 'step')


class CheckpointError(RuntimeError):
  """A checkpoint file that cannot be loaded safely, or does not fit the state it is restored into."""


# The numpy scalar types a checkpoint's numbers may have: Score SDE's float64 learning rate, and integer steps.
_NUMPY_SCALAR_TYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16,
                       np.float32, np.float64)


def checkpoint_safe_globals():
  """The globals, beyond torch's defaults, that Score SDE checkpoints need to unpickle.

  Score SDE's `optimization_manager` sets the learning rate to `lr * np.minimum(step / warmup, 1.0)`, a
  `numpy.float64`, so the optimizer's state dict pickles a numpy scalar: `numpy.core.multiarray.scalar` (its
  name under numpy 1.x, `numpy._core.multiarray.scalar` under numpy 2.x), called with a `numpy.dtype` whose
  unpickling builds an instance of the float64 dtype class (`numpy.dtypes.Float64DType` for numpy >= 1.25).
  A step saved as a numpy integer (`np.int64`, as a loop over `np.arange` gives it) unpickles the same way with
  the integer dtype's class, so the dtype classes of numpy's integer and floating-point scalars are allowed too:
  building a dtype runs no code from the file. Nothing else is allowed: any other global in a checkpoint makes
  `restore_checkpoint` refuse the file.

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
  allowed = [np.dtype, *(type(np.dtype(t)) for t in _NUMPY_SCALAR_TYPES)]
  # Pin the name a checkpoint spells, whatever module this numpy defines the function in.
  allowed.append((scalar, 'numpy.core.multiarray.scalar'))
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


# The config fields that set a Score SDE model's parameter shapes (models/*.py): what to compare when a checkpoint
# does not fit the model built from the config.
MODEL_SHAPE_FIELDS = ('model.name', 'model.nf', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
                      'model.conditional', 'model.resblock_type', 'model.progressive', 'model.progressive_input',
                      'model.embedding_type', 'model.num_scales', 'data.image_size', 'data.num_channels')


def _shown(items, limit=6, sep=', '):
  """At most `limit` items, then how many more: a mismatch of a whole model stays one readable line."""
  text = sep.join(items[:limit])
  return text + (f' and {len(items) - limit} more' if len(items) > limit else '')


def _width_ratio(shape_pairs):
  """The one ratio of checkpoint to model sizes over every differing dimension, or None if there is not one."""
  ratios = set()
  for ckpt_shape, model_shape in shape_pairs:
    if len(ckpt_shape) != len(model_shape):
      return None
    ratios.update(round(a / b, 6) for a, b in zip(ckpt_shape, model_shape) if a != b and b)
  return ratios.pop() if len(ratios) == 1 else None


def _model_mismatch(model_state, loaded_state):
  """Lists how a loaded model state dict differs from the model's: missing, unexpected and mismatched keys (a few
  of each), and which config fields to compare."""
  missing = [k for k in model_state if k not in loaded_state]
  unexpected = [k for k in loaded_state if k not in model_state]
  mismatched = [k for k in model_state
                if k in loaded_state and tuple(getattr(loaded_state[k], 'shape', ())) != tuple(model_state[k].shape)]
  shapes = [(tuple(loaded_state[k].shape), tuple(model_state[k].shape)) for k in mismatched]
  problems = []
  shape_mismatches = [f'{k}: checkpoint {c} vs model {m}' for k, (c, m) in zip(mismatched, shapes)]
  for name, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                     ('shape mismatches', shape_mismatches)):
    if keys:
      problems.append(f'{len(keys)} {name}: {_shown(keys)}')
  ckpt_prefixed = all(k.startswith('module.') for k in loaded_state)
  model_prefixed = all(k.startswith('module.') for k in model_state)
  ratio = _width_ratio(shapes) if mismatched and not missing and not unexpected else None
  if missing and unexpected and ckpt_prefixed != model_prefixed:
    # The usual cause: a checkpoint saved without nn.DataParallel restored into a wrapped model, or the reverse.
    problems.append("(the checkpoint's keys and the model's differ in nn.DataParallel's 'module.' prefix)")
  elif ratio is not None:
    problems.append(f'every differing size is {ratio:g} times the model\'s: the checkpoint was likely trained with '
                    f'model.nf {ratio:g} times the config\'s')
  elif missing or unexpected or mismatched:
    problems.append('the checkpoint comes from a model of another architecture or size: compare the config fields '
                    f'that set the shapes ({", ".join(MODEL_SHAPE_FIELDS)}) with those of the run that saved it')
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
  if checkpoint_step(loaded['step']) is None:
    problems.append(f"entry 'step' is {loaded['step']!r}, not an integer >= 0")
  return problems


def checkpoint_step(step):
  """A checkpoint's `step` as an int, or None if it is not an integer >= 0.

  Score SDE saves a Python int; a numpy integer or a 0-dim integer tensor (what other training loops count
  with) is the same step.
  """
  if isinstance(step, torch.Tensor):
    if step.dim() != 0 or step.dtype == torch.bool or step.is_floating_point() or step.is_complex():
      return None
    step = step.item()
  if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
    return None
  return int(step)


def _real(value):
  """`value` as a float if it is a real number (bool excluded) or a 0-dim real tensor, else None."""
  if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
    return float(value.item())
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  return None


# The ranges torch.optim's constructors allow for the hyperparameters of a param group, as [low, high): a
# checkpoint's param groups replace the optimizer's at `load_state_dict` (only `lr` is set again from the config,
# at every step), so a NaN `eps` from a file would silently stop every update. `betas` applies to each beta.
_HYPERPARAMETER_RANGES = {'lr': (0., math.inf), 'initial_lr': (0., math.inf), 'eps': (0., math.inf),
                          'weight_decay': (0., math.inf), 'momentum': (0., math.inf), 'betas': (0., 1.)}

# Optimizer state entries that are scalars rather than tensors of their parameter's shape: the step count (Adam
# and most of torch.optim), NAdam's `mu_product`, ASGD's `eta` and `mu`.
_SCALAR_STATE = ('step', 'mu_product', 'eta', 'mu')


def _hyperparameter_problems(index, group):
  """What is wrong with the hyperparameters of the saved param group `index` (a list of strings)."""
  problems = []
  for name, value in group.items():
    if name == 'params':
      continue
    low, high = _HYPERPARAMETER_RANGES.get(name, (-math.inf, math.inf))
    if name == 'betas':
      values = [_real(v) for v in value] if isinstance(value, (list, tuple)) and len(value) == 2 else [None]
      allowed = f'two finite numbers in [{low:g}, {high:g})'
    else:
      values = [_real(value)]
      if values[0] is None and name not in _HYPERPARAMETER_RANGES:
        continue  # a flag (amsgrad, maximize, foreach...) or None: torch.optim's own
      allowed = 'a finite number' + (f' >= {low:g}' if low > -math.inf else '')
    if not all(v is not None and math.isfinite(v) and low <= v < high for v in values):
      problems.append(f'optimizer param_groups[{index}].{name} is {value!r} (allowed: {allowed})')
  return problems


def _optimizer_problems(saved, optimizer):
  """What keeps the saved optimizer state dict `saved` from fitting `optimizer` (a list of strings).

  Checked here because `load_state_dict` checks only the number of parameters per group: a state tensor of
  another shape, or a NaN hyperparameter, loads and fails (or silently stops training) steps later.
  """
  problems = []
  for index, group in enumerate(saved['param_groups']):
    problems += _hyperparameter_problems(index, group)
  # load_state_dict pairs the saved parameter ids with the optimizer's parameters in order, over all groups.
  ids = [i for g in saved['param_groups'] for i in g['params']]
  params = [p for g in optimizer.param_groups for p in g['params']]
  if len(set(ids)) != len(ids):
    problems.append('optimizer param_groups list a parameter id more than once')
  param_of = dict(zip(ids, params))
  for key, entry in saved['state'].items():
    field = f'optimizer state[{key!r}]'
    if key not in param_of:
      problems.append(f'{field} belongs to no parameter of its param_groups')
      continue
    if not isinstance(entry, dict):
      problems.append(f'{field} is a {type(entry).__name__}, not a dict')
      continue
    shape = tuple(param_of[key].shape)
    for name, value in entry.items():
      if name in _SCALAR_STATE:
        number = _real(value)
        if number is None or not math.isfinite(number) or (name == 'step' and number < 0):
          problems.append(f'{field}.{name} is {value!r}, not a finite number' + (' >= 0' if name == 'step' else ''))
      elif value is None:
        continue  # e.g. SGD's momentum_buffer before the first step with momentum
      elif not isinstance(value, torch.Tensor):
        problems.append(f'{field}.{name} is a {type(value).__name__}, not a tensor')
      elif tuple(value.shape) != shape:
        problems.append(f'{field}.{name} has shape {tuple(value.shape)}, its parameter {shape}')
      elif not value.is_floating_point():
        problems.append(f'{field}.{name} is of dtype {value.dtype}, not a floating-point type')
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
  problems = _optimizer_problems(loaded['optimizer'], state['optimizer'])
  if problems:
    raise CheckpointError(f'Checkpoint {str(path)!r} has an optimizer state that does not fit the optimizer: '
                          f'{_shown(problems, sep="; ")}.')

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
  # An int, whatever integer type the file holds: saved again as Score SDE saves it.
  state['step'] = checkpoint_step(loaded['step'])
  return state


def save_checkpoint(ckpt_dir, state):
  """Saves `state` in Score SDE's format, atomically: a crash mid-save leaves the previous file intact.

  The checkpoint is written with `atomic_write`: to a temporary file in the same directory, flushed to disk,
  then renamed over `ckpt_dir`.

  Args:
    ckpt_dir: path of the checkpoint file (the name is Score SDE's).
    state: Score SDE's training state, `{'optimizer', 'model', 'ema', 'step'}`.

  Raises:
    WriteError: the file could not be written (a full disk, say); the previous file is intact.
  """
  saved_state = {
      'optimizer': state['optimizer'].state_dict(),
      'model': state['model'].state_dict(),
      'ema': state['ema'].state_dict(),
      'step': state['step'],
  }
  with atomic_write(ckpt_dir, description=f'checkpoint {ckpt_dir}') as f:
    torch.save(saved_state, f)


class WriteError(OSError):
  """A file that could not be written (a full disk, a quota, an I/O error): one line naming it and the OS error.

  `errno`, `strerror` and `filename` are those of the OS error, which is the `__cause__`'s chain.
  """

  def __init__(self, description, error, filename=None):
    super().__init__(error.errno, error.strerror or str(error), filename or error.filename)
    detail = f'[Errno {error.errno}] {error.strerror}' if error.errno is not None else str(error)
    self.message = f'Cannot write {description}: {detail}'

  def __str__(self):
    return self.message


def os_error_in(error):
  """The OSError `error` is or was caused by (the first in its `__cause__` / `__context__` chain), or None.

  A writer reports a failed write in its own words: torch.save as `RuntimeError: [enforce fail at
  inline_container.cc] unexpected pos`, zipfile (np.savez) as `ValueError: seek of closed file`; the OSError
  (ENOSPC, EIO...) is only in the chain.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def write_errors(description, filename=None):
  """Re-raises an error of the body that an OSError caused as a `WriteError` naming `description`.

  Args:
    description: what was being written, for the message: `'checkpoint W/checkpoints/checkpoint_3.pth'`.
    filename: the file, for the error's `filename` (default: the OS error's).
  """
  try:
    yield
  except WriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    cause = os_error_in(e)
    if cause is None:
      raise
    raise WriteError(description, cause, filename) from e


def _abandon_zip_writers(error, file):
  """Detaches `file` from the `zipfile.ZipFile`s a failed write left in its traceback's frames.

  np.savez does not close its ZipFile when a write fails: when the traceback is freed, `ZipFile.__del__` would
  finish the archive in the closed temporary file and print 'Exception ignored ... seek of closed file' with a
  traceback on the console, after the one-line error.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      for value in list(tb.tb_frame.f_locals.values()):
        if isinstance(value, zipfile.ZipFile) and value.fp is file:
          value.fp = None  # its close() (and __del__) then does nothing
      tb = tb.tb_next
    error = error.__cause__ or error.__context__


@contextlib.contextmanager
def atomic_write(path, description=None):
  """Opens a binary file that replaces `path` only once the body has written it completely.

  The data go to a temporary file in the same directory, are flushed to disk, then renamed over `path`
  (`os.replace` is atomic on POSIX and Windows), and the directory is flushed too, so the new file survives a
  power loss: a crash or an error in the body leaves the previous file intact, and a reader polling the folder
  never sees half a file. An exception (KeyboardInterrupt included) removes the temporary file; a process
  killed outright (SIGKILL, power loss) cannot, and leaves `.<name>.<32 hex digits>.tmp` behind, which
  `remove_stale_temp_files` removes (training does at its next start). Parent directories are created.

  Args:
    path: the file.
    description: what the file is, for errors (default: its path), e.g. `'checkpoint W/checkpoints-meta/...'`.

  Raises:
    WriteError: an OSError (a full disk, a quota, an I/O error) stopped the write, however the writer reported
      it: one line naming the file and the OS error; the previous file is intact, the temporary file removed.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    with write_errors(description or str(path), str(path)):
      path.parent.mkdir(parents=True, exist_ok=True)
      # O_EXCL: never write through a file someone else created; mode 0o666 lets the umask apply as for open().
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
      with os.fdopen(fd, 'wb') as f:
        try:
          yield f
          f.flush()
          os.fsync(f.fileno())
        except Exception as e:
          _abandon_zip_writers(e, f)
          raise
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


# ----------------------------------------------------------------------------------------------------------
# The training run's save policy
# ----------------------------------------------------------------------------------------------------------


class NonFiniteLossMonitor:
  """Remembers the first step whose training loss, or gradient norm, was NaN or infinite, without a host-device
  sync.

  `update` runs every step with device-side ops only; `check` reads the flags (one sync) and is called at
  `log_freq` and before every checkpoint save, so no checkpoint is ever written after a non-finite loss or
  gradient. Under torchrun the flags are combined over ranks (the earliest bad step of any), so every rank
  stops alike.
  """

  _NONE = torch.iinfo(torch.long).max
  _WHAT = ('training loss', 'gradient norm')

  def __init__(self, device):
    self._first_bad_step = torch.full((len(self._WHAT),), self._NONE, dtype=torch.long, device=device)

  def update(self, loss, step, grad_norm=None):
    """Records `step` if `loss` (or `grad_norm`, a 0-dim tensor or None) is not finite; device-side only."""
    values = [loss.detach().float().reshape(())]
    values.append(values[0].new_zeros(()) if grad_norm is None else grad_norm.detach().float().reshape(()))
    bad = ~torch.isfinite(torch.stack(values))
    self._first_bad_step = torch.where(bad, torch.clamp(self._first_bad_step, max=step), self._first_bad_step)

  def check(self, last_good=''):
    """Raises `FloatingPointError` naming the first bad step (and `last_good`, a sentence) if there was one."""
    first_bad = distributed.all_reduce_min(self._first_bad_step).tolist()
    bad = [(step, what) for step, what in zip(first_bad, self._WHAT) if step != self._NONE]
    if bad:
      step, what = min(bad)
      raise FloatingPointError(
          f'The {what} is not finite (NaN or inf) at step {step}; training stopped, and nothing from that step on '
          f'was saved. {last_good or "The checkpoints written before that step are intact."} Lower optim.lr or '
          'check the data.')


def param_scale(state):
  """The largest absolute value of a trainable parameter (NaN if one is NaN): one host sync."""
  params = [p.detach() for p in state['model'].parameters() if p.requires_grad]
  if not params:
    return 0.
  return float(torch.stack([p.abs().max() for p in params]).max())


def _ema_finite(state):
  shadow = state['ema'].shadow_params
  return not shadow or bool(torch.stack([torch.isfinite(p).all() for p in shadow]).all())


class Checkpointer:
  """The checkpoints of one training run in its workdir, and when and whether to write them.

  Files (Score SDE's layout): the resume point `W/checkpoints-meta/checkpoint.pth`, written every
  `preemption_freq` steps and at the last step, and the snapshots `W/checkpoints/checkpoint_{k}.pth`, written at
  step k * `snapshot_freq` and at the last step. Rank 0 writes; every rank runs the checks, which agree.

  The object owns what the policy remembers between saves: the step of the resume point on disk
  (`resume_step`, None before the first), the largest |parameter| at the last good save (the growth bound
  compares with it), and the non-finite monitor (`monitor`), which the training loop updates every step.
  """

  def __init__(self, workdir, *, n_iters, snapshot_freq, preemption_freq, max_param_growth, device, lock=None):
    """Nothing is read or written here.

    Args:
      workdir: the run's working directory.
      n_iters, snapshot_freq, preemption_freq, max_param_growth: the validated `training.n_iters`,
        `training.snapshot_freq`, `training.snapshot_freq_for_preemption` and `training.max_param_growth`
        (`run_lib` reads and validates them).
      device: where the monitor's flags live (the training device).
      lock: the `preemption.WorkdirLock` rank 0 holds (checked before every save), or None.
    """
    self.meta_path = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')
    self.checkpoint_dir = os.path.join(workdir, 'checkpoints')
    self.workdir = workdir
    self.n_iters, self.snapshot_freq, self.preemption_freq = n_iters, snapshot_freq, preemption_freq
    self.max_param_growth = max_param_growth
    self.lock = lock
    self.monitor = NonFiniteLossMonitor(device)
    self._resume_step = None
    self._param_scale = None

  @property
  def resume_step(self):
    """The step the resume point on disk holds, or None if there is none yet."""
    return self._resume_step

  def restore(self, state, device):
    """Restores the resume point into `state` if there is one (strictly: a checkpoint that does not fit the
    model or holds NaN raises `CheckpointError`, before anything is written); returns `state`."""
    if os.path.lexists(self.meta_path):  # a dangling symbolic link is an error, not "no checkpoint"
      state = restore_checkpoint(self.meta_path, state, device)
      self._resume_step = int(state['step'])
      logging.info('Resuming from %s at step %d.', self.meta_path, self._resume_step)
    else:
      logging.info('No checkpoint at %s: training starts from a fresh initialization.', self.meta_path)
    self._param_scale = param_scale(state)
    return state

  def last_good(self):
    """A sentence naming the last good checkpoint on disk, for errors that stop training."""
    if self._resume_step is None:
      return 'No checkpoint was written yet.'
    return (f'The last good checkpoint is {self.meta_path} (step {self._resume_step}); training resumes from it '
            'when started again.')

  def check_finite_loss(self):
    """Raises `FloatingPointError` if the loss or gradient norm was not finite at a step since the start."""
    self.monitor.check(self.last_good())

  def snapshot_path(self, step):
    return os.path.join(self.checkpoint_dir, f'checkpoint_{step // self.snapshot_freq}.pth')

  def snapshot_due(self, step):
    return step == self.n_iters or step % self.snapshot_freq == 0

  def resume_point_due(self, step):
    return step == self.n_iters or step % self.preemption_freq == 0

  def check_before_save(self, state, step):
    """Refuses to write checkpoints of a state that is not finite, or has exploded, or when the lock is lost.

    The criterion (docs/workflow.md, "When a run dies"): no NaN/inf training loss or gradient norm at any step
    since the last check; every trainable parameter and EMA weight finite; the largest |trainable parameter| at
    most `max_param_growth` times max(1, its value at the last good checkpoint). Parameters are the same on
    every rank, so every rank reaches the same verdict; rank 0 also checks that it still holds the workdir lock.

    Raises:
      FloatingPointError: naming the step, the problem and the last good checkpoint.
      preemption.WorkdirLocked: the lock file is no longer this trainer's.
    """
    self.check_finite_loss()
    scale = param_scale(state)
    problem = None
    if not math.isfinite(scale) or not _ema_finite(state):
      problem = 'the parameters or their EMA are not finite (NaN or inf)'
    elif scale > self.max_param_growth * max(1., self._param_scale):
      problem = (f'the largest |parameter| grew to {scale:.4g}, more than training.max_param_growth='
                 f'{self.max_param_growth:g} times max(1, {self._param_scale:.4g}), its value at the last check: '
                 'the weights exploded')
    if problem is not None:
      raise FloatingPointError(f'Not saving at step {step}: {problem}. Training stopped. {self.last_good()} Lower '
                               'optim.lr (or raise training.max_param_growth if such growth is expected).')
    self._param_scale = scale

    def lock_problem():
      problem = None if self.lock is None else self.lock.check_held()
      if problem is not None:
        raise preemption.WorkdirLocked(f'Not saving at step {step}: {problem}. Another trainer may be writing '
                                       'into this workdir; this one stops without writing.')

    distributed.on_main_rank(lock_problem)

  def save_due(self, state, step):
    """Writes the snapshot and the resume point due at `step` (rank 0), after `check_before_save`; returns
    whether a snapshot was due."""
    due_meta, due_snapshot = self.resume_point_due(step), self.snapshot_due(step)
    if due_meta or due_snapshot:
      self.check_before_save(state, step)
    if distributed.context().is_main:
      # The snapshot first, each file durable before the next: once the resume point is past step k, no run
      # writes snapshot k again, so a kill between the two writes must find the snapshot on disk.
      if due_snapshot:
        path = self.snapshot_path(step)
        save_checkpoint(path, state)
        logging.info('step: %d, saved %s', step, path)
      if due_meta:
        save_checkpoint(self.meta_path, state)
    if due_meta:
      self._resume_step = step
    return due_snapshot

  def save_resume_point(self, state):
    """Saves the resume point at the state's step, if it is not there already (for a stop on a signal).

    Returns:
      What was done, as a phrase for the log line.
    """
    step = int(state['step'])
    if self._resume_step == step:
      return f'the resume point {self.meta_path} is at this step already'
    if step == 0:
      return 'no step was trained: nothing to save'
    self.check_before_save(state, step)
    if distributed.context().is_main:
      save_checkpoint(self.meta_path, state)
    self._resume_step = step
    return f'saved the resume point {self.meta_path}'

  def prepare(self, state):
    """Before training writes anything (rank 0; an error there stops every rank): removes the temporary files
    of killed saves, and writes the snapshot due at the resume point's step if it is missing.

    A run of an earlier version, killed between writing its resume point and its snapshot, resumed past the
    snapshot's step and never wrote it; the resume point holds exactly the state the snapshot would have.
    """

    def prepare():
      # Under the lock no other process writes the checkpoints: a temporary file there is what a killed save
      # left. In the workdir itself, another trainer may be writing its lock record (for milliseconds) to be
      # refused.
      for folder, min_age in ((self.checkpoint_dir, 0.), (os.path.dirname(self.meta_path), 0.), (self.workdir, 60.)):
        remove_stale_temp_files(folder, min_age_seconds=min_age)
      step = self._resume_step
      if step and self.snapshot_due(step) and not os.path.lexists(self.snapshot_path(step)):
        path = self.snapshot_path(step)
        logging.warning('The snapshot %s due at step %d is missing (a run killed between its two saves): writing '
                        'it from the resume point, which holds that step.', path, step)
        save_checkpoint(path, state)

    distributed.on_main_rank(prepare)

  def check_folders(self):
    """Creates the checkpoint folders and checks they are writable (call on rank 0)."""
    # Before the first step: an unwritable folder found at the first checkpoint would lose the steps before it.
    check_writable(self.checkpoint_dir, 'the snapshot checkpoints')
    check_writable(os.path.dirname(self.meta_path), 'the resume point (preemption checkpoint)')


# ----------------------------------------------------------------------------------------------------------
# Waiting for a checkpoint (evaluation)
# ----------------------------------------------------------------------------------------------------------

# Evaluation waits for checkpoints that training has not written yet: it checks every CHECKPOINT_POLL_SECONDS
# (Score SDE: 60 s), stops when no live trainer holds the workdir lock, and gives up with `TimeoutError` after
# `eval.wait_limit_seconds`. CHECKPOINT_WAIT_LIMIT_SECONDS, if not None, lowers that bound further (for scripts
# and tests), and is `wait_for_checkpoint`'s default (None: no bound, as Score SDE).
CHECKPOINT_POLL_SECONDS = 60.
CHECKPOINT_WAIT_LIMIT_SECONDS = None


class MissingCheckpointError(FileNotFoundError):
  """A checkpoint that does not exist, and that no running trainer will write.

  Attributes:
    reason: why no trainer will write it (the workdir lock's state), for messages of their own.
  """

  def __init__(self, message, reason=''):
    super().__init__(message)
    self.reason = reason


def wait_for_checkpoint(path, poll_seconds=None, limit_seconds=None, trainer_status=None, logged=None):
  """Waits until `path` exists, as Score SDE's evaluation waits for training to write a checkpoint.

  Args:
    path: the checkpoint file.
    poll_seconds: seconds between checks; default `CHECKPOINT_POLL_SECONDS`.
    limit_seconds: give up after this many seconds; default `CHECKPOINT_WAIT_LIMIT_SECONDS` (None: forever).
    trainer_status: optional callable returning `(alive, description)`, e.g. `preemption.trainer_status` of
      the workdir: while the file is missing, `alive` False stops the wait (nothing will write it), None
      (cannot tell) waits on.
    logged: optional set shared by successive calls for one checkpoint, so that each message is logged once.

  Raises:
    MissingCheckpointError: the checkpoint does not exist and `trainer_status` says no trainer runs.
    TimeoutError: the checkpoint did not appear within `limit_seconds`.
  """
  poll_seconds = CHECKPOINT_POLL_SECONDS if poll_seconds is None else poll_seconds
  limit_seconds = CHECKPOINT_WAIT_LIMIT_SECONDS if limit_seconds is None else limit_seconds
  start = time.time()
  logged = set() if logged is None else logged
  description = ''
  # lexists: a dangling symbolic link is there, and restoring it says what is wrong with it.
  while not os.path.lexists(path):
    if trainer_status is not None:
      alive, description = trainer_status()
      # Look again: a trainer writes its last snapshot before it releases the lock.
      if alive is False and not os.path.lexists(path):
        raise MissingCheckpointError(
            f'Checkpoint {path} does not exist, and no trainer will write it: {description}. Check eval.begin_ckpt '
            'and eval.end_ckpt (checkpoint k is written at step k * training.snapshot_freq and at the last step), '
            'or set eval.skip_missing_ckpts=True to evaluate the checkpoints that exist.', reason=description)
      if alive is None and 'unknown' not in logged:
        logging.warning('%s; waiting for %s as long as allowed.', description, path)
        logged.add('unknown')
    waited = time.time() - start
    if limit_seconds is not None and waited >= limit_seconds:
      raise TimeoutError(f'Checkpoint {path} did not appear within {limit_seconds:g} s (eval.wait_limit_seconds)'
                         + (f'; {description}' if description else '') + '.')
    if 'waiting' not in logged:
      logging.warning('Waiting for %s: training has not written it yet (checking every %g s%s).', path,
                      poll_seconds, '' if limit_seconds is None else f', for at most {limit_seconds:g} s')
      logged.add('waiting')
    time.sleep(poll_seconds if limit_seconds is None else max(0., min(poll_seconds, limit_seconds - waited)))


def await_checkpoint(path, workdir, limit_seconds, skip_missing):
  """Waits for checkpoint `path` of `workdir`'s trainer (rank 0 decides, every rank follows).

  Args:
    path: the checkpoint file.
    workdir: the workdir whose lock says whether a trainer still runs.
    limit_seconds: `eval.wait_limit_seconds` (lowered to `CHECKPOINT_WAIT_LIMIT_SECONDS` if that is set).
    skip_missing: `eval.skip_missing_ckpts`: a checkpoint no trainer will write is skipped (with a warning).

  Returns:
    True to evaluate it, False to skip it (on every rank).

  Raises:
    MissingCheckpointError: no trainer will write it, and `skip_missing` is False.
    TimeoutError: it did not appear within the limit.
  """
  if CHECKPOINT_WAIT_LIMIT_SECONDS is not None:
    limit_seconds = min(limit_seconds, CHECKPOINT_WAIT_LIMIT_SECONDS)
  start, logged = time.time(), set()

  def wait_a_while():
    # Rank 0 waits at most one poll interval per call: the other ranks wait for its verdict inside a collective,
    # which must end well within training.dist_timeout_seconds however long training takes to write the file.
    left = limit_seconds - (time.time() - start)
    last = left <= CHECKPOINT_POLL_SECONDS
    try:
      wait_for_checkpoint(path, limit_seconds=max(0., left if last else CHECKPOINT_POLL_SECONDS),
                          trainer_status=lambda: preemption.trainer_status(workdir), logged=logged)
    except TimeoutError as e:
      if last:
        # The message of the whole wait, with what the last poll learned about the trainer.
        said = str(e).split('(eval.wait_limit_seconds)', 1)[-1]
        raise TimeoutError(f'Checkpoint {path} did not appear within {limit_seconds:g} s (eval.wait_limit_seconds)'
                           f'{said}') from e
      return None  # not yet: ask again
    except MissingCheckpointError as e:
      if not skip_missing:
        raise
      logging.warning('Skipping checkpoint %s (eval.skip_missing_ckpts=True): it does not exist, and no trainer '
                      'will write it: %s.', path, e.reason)
      return False
    return True

  while True:
    verdict = distributed.broadcast_object(distributed.on_main_rank(wait_a_while))
    if verdict is not None:
      return verdict

