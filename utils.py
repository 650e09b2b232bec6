"""Config validation and small tensor helpers (Score SDE's `utils.py`).

Each config field is validated once, with the helpers below, so that every error message has the same shape:
the field, the value given, and what is allowed. A field read by one module is checked there, where it is
consumed. A field read by several modules has its rule written once, in `CONFIG_FIELDS`, and applied by
`config_value` (or `check_field`, for a value already taken from the config) wherever it is read; a constraint
of one consumer (a model that needs a power-of-two size, a bound set by another field) narrows that rule at the
consumer. A field whose allowed values are what one module implements (`model.normalization`) is checked by
that module's accessor, which the other readers call.

Score SDE's checkpoint functions `restore_checkpoint` and `save_checkpoint` live in `checkpoints.py` (with
the rest of checkpoint I/O and the training run's save policy) and are importable from here, where Score
SDE's users import them.
"""

import functools
import hashlib
import math
import numbers
import os
import stat

import numpy as np
from scipy import stats
import torch

from checkpoints import restore_checkpoint, save_checkpoint  # noqa: F401  (Score SDE's names, kept here)


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


def check_number(field, value, *, low=None, high=None, low_open=False, high_open=False, integer=False,
                 allow_inf=False):
  """Raises `ValueError` unless `value` is a finite real (or integer) number in the given range.

  NaN is always refused, and so are +-inf unless `allow_inf`: an infinite weight, rate or epsilon passes every
  ordering test but turns the first loss or update into NaN (or, for `optim.eps`, into zero updates).

  Args:
    field: the config field's dotted name.
    value: the value the config holds.
    low, high: bounds, `None` for unbounded.
    low_open, high_open: whether the bound itself is excluded.
    integer: whether the value must be an integer.
    allow_inf: accept +-inf (within the bounds), for the fields where inf means "no bound" (e.g.
      `eval.wait_limit_seconds`).

  Returns:
    `value`, unchanged.
  """
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ValueError(f'config.{field}={value!r} must be {"an integer" if integer else "a real number"}.')
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  # value != value catches NaN; abs() of a huge int stays exact, unlike math.isfinite's float conversion.
  not_finite = value != value or (not allow_inf and abs(value) == math.inf)
  if too_low or too_high or not_finite:
    # An unbounded side shows inf as excluded unless it is allowed.
    lo = '[' if low is not None and not low_open or low is None and allow_inf else '('
    hi = ']' if high is not None and not high_open or high is None and allow_inf else ')'
    interval = f'{lo}{"-inf" if low is None else low}, {"inf" if high is None else high}{hi}'
    problem = 'is not a finite number' if not_finite and not (too_low or too_high) else 'is out of range'
    raise ValueError(f'config.{field}={value!r} {problem}; allowed: {interval}.')
  return value


# The rule of each config field that more than one call site reads: `check_number`'s keywords for a number, the
# allowed values for a choice, nothing for a bool. Where the call sites used to differ, the rule is the one the
# value's use needs (`fourier_scale` > 0: a zero scale makes every Fourier feature constant in time; `n_iters` >=
# 0: 0 trains nothing, and the cosine schedule, which divides by it, asks for >= 1).
_BOOL = dict(kind='bool')
_COUNT = dict(kind='number', low=1, integer=True)
_POSITIVE = dict(kind='number', low=0, low_open=True)
CONFIG_FIELDS = {
    'seed': dict(kind='number', low=0, integer=True),
    'data.image_size': _COUNT,
    'data.num_channels': _COUNT,
    'data.centered': _BOOL,
    'data.random_flip': _BOOL,
    'data.uniform_dequantization': _BOOL,
    'training.batch_size': _COUNT,
    'training.n_iters': dict(kind='number', low=0, integer=True),
    'training.grad_accum_steps': _COUNT,
    'training.continuous': _BOOL,
    'training.reduce_mean': _BOOL,
    'training.likelihood_weighting': _BOOL,
    'eval.batch_size': _COUNT,
    'optim.lr': dict(kind='number', low=0.),
    'model.nf': _COUNT,
    'model.num_scales': _COUNT,
    'model.sigma_min': _POSITIVE,
    'model.sigma_max': _POSITIVE,
    'model.scale_by_sigma': _BOOL,
    'model.fourier_scale': _POSITIVE,
    'model.embedding_type': dict(kind='choice', allowed=('fourier', 'positional')),
}


def check_field(field, value, *, allowed=None, **bounds):
  """Raises `ValueError` unless `value` passes the rule of `CONFIG_FIELDS[field]` and the consumer's own.

  Args:
    field: a dotted name of `CONFIG_FIELDS`, e.g. `'data.image_size'`.
    value: the field's value.
    allowed: optional values this consumer accepts (a subset of the rule's), e.g. `(1,)` for the toy data's
      image size.
    **bounds: optional `check_number` keywords of this consumer that tighten a number's rule, e.g. `high=256`.

  Returns:
    `value` (a bool field's as a Python bool).
  """
  rule = dict(CONFIG_FIELDS[field])
  kind = rule.pop('kind')
  if kind == 'bool':
    value = check_bool(field, value)
  elif kind == 'choice':
    value = check_choice(field, value, rule['allowed'])
  else:
    value = check_number(field, value, **rule)
    if bounds:
      check_number(field, value, **{**rule, **bounds})
  if allowed is not None:
    check_choice(field, value, allowed)
  return value


def config_value(config, field, **narrowing):
  """The value of the dotted `field` of `config`, validated by `check_field` (same keywords)."""
  return check_field(field, functools.reduce(getattr, field.split('.'), config), **narrowing)


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


def _format_seconds(seconds):
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}'


class Progress:
  """Progress of a long loop: rate and ETA for log lines (the record), and a tqdm bar on an interactive
  terminal (never in a log file or a batch job's output)."""

  def __init__(self, total, desc, unit='it', done=0, show_bar=True, eta_basis=None):
    """Starts the clock.

    Args:
      total: the number of units of the whole loop, or None if unknown (no ETA then).
      desc: what the loop does (the bar's label).
      unit: the unit's name, e.g. 'step', 'batch'.
      done: units already done before this start (a resumed run's steps), not counted in the rate.
      show_bar: allow the tqdm bar (rank 0 only, under torchrun).
      eta_basis: what the ETA assumes, shown beside it where the rate is known to change (None: nothing).
    """
    import sys  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    self._time = time.time
    self.total, self.unit, self.first, self.eta_basis = total, unit, done, eta_basis
    # 'batch' -> 'batches', 'step' -> 'steps'.
    self.units = unit + ('es' if unit.endswith(('s', 'sh', 'ch', 'x')) else 's')
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
    text = f'{done}/{self.total if self.total is not None else "?"} {self.units}, {rate:.3g} {self.units}/s'
    if self.total is not None and rate > 0:
      text += f', ETA {_format_seconds((self.total - done) / rate)}'
      if self.eta_basis:
        text += f' ({self.eta_basis})'
    return text

  def close(self):
    if self.bar is not None:
      self.bar.close()


def file_kind(path):
  """What `path` is, judged by its target when it is a symlink (`os.stat`), without opening it.

  Returns:
    'file', 'directory', 'FIFO (named pipe)', 'socket', 'character device', 'block device' or 'other'.

  Raises:
    FileNotFoundError: nothing is there, or a symlink whose target is missing (the message, which does not
      name the path, says which).
  """
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    if os.path.lexists(path):
      raise FileNotFoundError(f'a symlink to {os.readlink(path)!r}, which does not exist') from None
    raise FileNotFoundError('no such file or directory') from None
  for test, kind in ((stat.S_ISREG, 'file'), (stat.S_ISDIR, 'directory'), (stat.S_ISFIFO, 'FIFO (named pipe)'),
                     (stat.S_ISSOCK, 'socket'), (stat.S_ISCHR, 'character device'), (stat.S_ISBLK, 'block device')):
    if test(mode):
      return kind
  return 'other'


def is_remote(path):
  """Whether `path` has a `scheme://` prefix: a file system of tf.io.gfile (gs://, s3://, ...) or a URL (a TF-Hub
  handle), which the local checks here cannot judge."""
  return '://' in path


def check_input_path(path, what, expected='file', missing_ok=False):
  """Raises unless `path` is a regular file (or, with `expected='directory'`, a directory), judged by its target.

  Called before any input is opened: a device such as /dev/zero reads forever and a FIFO blocks the open.

  Args:
    path: a local path (`is_remote` paths are the caller's to check).
    what: how the message names it, e.g. `'config.data.path'`.
    expected: 'file' or 'directory'.
    missing_ok: nothing at `path` is fine (the caller creates it, or reports it in its own words); a dangling
      symlink still raises.

  Returns:
    `path`, unchanged.

  Raises:
    FileNotFoundError: nothing (or a dangling symlink) is there. ValueError: something else than `expected` is.
  """
  if missing_ok and not os.path.lexists(path):
    return path
  try:
    kind = file_kind(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{what}={path!r}: {e}.') from None
  if kind != expected:
    wanted = 'a regular file' if expected == 'file' else 'a directory'
    raise ValueError(f'{what}={path!r} is {"an" if kind[0] in "aeiou" else "a"} {kind}, not {wanted}.')
  return path


def read_npz(path):
  """Every array of the `.npz` file `path`, by name, read into memory; the file is closed on return (and no
  pickled object is loaded)."""
  with np.load(path, allow_pickle=False) as f:
    return {name: f[name] for name in f.files}


def standard_error(values):
  """The standard error of the mean of `values` (sample standard deviation / sqrt(n)); NaN for fewer than two."""
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  if values.size < 2:
    return float('nan')
  return float(values.std(ddof=1) / math.sqrt(values.size))


def t_interval(values, confidence=0.95):
  """Mean and half-width of the two-sided Student-t confidence interval of the mean (NaN half-width for one
  value).

  Args:
    values: the per-seed numbers.
    confidence: the interval's coverage.

  Returns:
    (mean, half_width): the interval is mean +- half_width (half_width = t quantile x `standard_error`).
  """
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  n = values.size
  if n == 0:
    return float('nan'), float('nan')
  mean = float(values.mean())
  if n < 2:
    return mean, float('nan')
  return mean, float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * standard_error(values))
