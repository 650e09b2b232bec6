"""Config validation and checkpoint I/O.

Config fields are validated where they are read, with the helpers below, so that every error message has
the same shape: the field, the value given, and what is allowed.
"""

import numbers


def check_choice(field, value, allowed):
  """Raises `ValueError` unless `value` is one of `allowed`.

  Args:
    field: the config field's dotted name, e.g. `'training.fp_wgt_type'`.
    value: the value the config holds.
    allowed: the allowed values.

  Returns:
    `value`, unchanged.
  """
  if value not in tuple(allowed):
    raise ValueError(f'config.{field}={value!r} is not allowed; choose one of {tuple(allowed)!r}.')
  return value


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
