"""Each config field is validated once: a field read by one module is checked there (one literal `check_*` call
in the project), a field read by several has its rule in `utils.CONFIG_FIELDS`, applied by `utils.config_value`
/ `utils.check_field` wherever it is read."""

import ast
import collections
import functools
import os

import ml_collections
import pytest

import datasets
import sde_lib
import utils
from configs.default_cifar10_configs import get_default_configs as cifar10_defaults
from configs.toy.default_toy_configs import get_default_configs as toy_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ('check_number', 'check_bool', 'check_choice')
ACCESSORS = ('config_value', 'check_field')


def _project_files(root=ROOT):
  """Every project .py file but the tests (and hidden folders such as the virtual environment)."""
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d not in ('tests', '__pycache__'))
    for name in sorted(files):
      if name.endswith('.py'):
        yield os.path.join(folder, name)


def _called_name(call):
  func = call.func
  return func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)


def _literal_arg(call, index):
  """The call's string literal argument at `index`, or None."""
  if len(call.args) > index and isinstance(call.args[index], ast.Constant):
    value = call.args[index].value
    return value if isinstance(value, str) else None
  return None


def scan_field_names(root=ROOT):
  """{field: ['file:line', ...]} of the literal fields of `check_*` calls, and of the accessors' calls."""
  checks, accessed = collections.defaultdict(list), collections.defaultdict(list)
  for path in _project_files(root):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
      if not isinstance(node, ast.Call):
        continue
      name = _called_name(node)
      where = f'{os.path.relpath(path, root)}:{node.lineno}'
      if name in CHECKS and _literal_arg(node, 0) is not None:
        checks[_literal_arg(node, 0)].append(where)
      elif name == 'check_field' and _literal_arg(node, 0) is not None:
        accessed[_literal_arg(node, 0)].append(where)
      elif name == 'config_value' and _literal_arg(node, 1) is not None:
        accessed[_literal_arg(node, 1)].append(where)
  return checks, accessed


def field_check_problems(root=ROOT, table=None):
  """Lines naming each field checked at more than one call site, or checked by hand although in the table."""
  table = utils.CONFIG_FIELDS if table is None else table
  checks, _ = scan_field_names(root)
  problems = []
  for field, sites in sorted(checks.items()):
    if field in table:
      problems.append(f'{field}: has a rule in utils.CONFIG_FIELDS, but is also checked at {", ".join(sites)}')
    elif len(sites) > 1:
      problems.append(f'{field}: checked at {len(sites)} call sites: {", ".join(sites)}')
  return problems


def test_each_field_is_checked_at_one_call_site_or_through_the_table():
  problems = field_check_problems()
  assert not problems, 'Validate each config field once (see utils.py):\n' + '\n'.join(problems)


def test_the_scan_finds_repeated_and_bypassed_checks(tmp_path):
  (tmp_path / 'a.py').write_text("import utils\nutils.check_number('seed', 1, low=0)\n"
                                 "utils.check_bool('x.flag', True)\n")
  (tmp_path / 'b.py').write_text("from utils import check_bool\ncheck_bool('x.flag', False)\n")
  problems = field_check_problems(str(tmp_path))
  assert problems == ["seed: has a rule in utils.CONFIG_FIELDS, but is also checked at a.py:2",
                      'x.flag: checked at 2 call sites: a.py:3, b.py:2']


def test_every_field_read_through_the_accessors_has_a_rule():
  _, accessed = scan_field_names()
  unknown = {field: sites for field, sites in accessed.items() if field not in utils.CONFIG_FIELDS}
  assert not unknown, f'Fields read through utils.config_value/check_field without a rule: {unknown}'
  # A table rule that no module reads any more is dead weight.
  assert set(accessed) == set(utils.CONFIG_FIELDS)


def _default_value(field):
  """The field's value in the default config of CIFAR-10, or of the toy data where it lives (the MLP's)."""
  for defaults in (cifar10_defaults, toy_defaults):
    try:
      return functools.reduce(getattr, field.split('.'), defaults())
    except AttributeError:
      continue
  raise AssertionError(f'config.{field} is in utils.CONFIG_FIELDS but in no default config')


@pytest.mark.parametrize('field', sorted(utils.CONFIG_FIELDS))
def test_every_table_field_exists_and_its_default_passes_its_rule(field):
  value = _default_value(field)
  assert utils.check_field(field, value) == value


@pytest.mark.parametrize('field, bad, message', [
    ('data.image_size', 0, r'config.data.image_size=0 is out of range; allowed: \[1, inf\)'),
    ('data.image_size', 32.0, r'config.data.image_size=32.0 must be an integer'),
    ('training.continuous', 1, r'config.training.continuous=1 is not allowed; choose one of \(True, False\)'),
    ('seed', -1, r'config.seed=-1 is out of range'),
    # Zero frequencies make every Fourier feature constant in time (NCSN++ used to accept 0, the MLP not).
    ('model.fourier_scale', 0., r'config.model.fourier_scale=0.0 is out of range; allowed: \(0, inf\)'),
])
def test_bad_table_values_are_refused_with_the_field_named(field, bad, message):
  with pytest.raises(ValueError, match=message):
    utils.check_field(field, bad)
  # Not type safe: a config file may hold a float where the default is an int.
  config = ml_collections.ConfigDict(cifar10_defaults().to_dict(), type_safe=False)
  section, _, name = field.rpartition('.')
  (getattr(config, section) if section else config)[name] = bad
  with pytest.raises(ValueError, match=message):
    utils.config_value(config, field)


def test_consumers_narrow_the_table_rule():
  config = cifar10_defaults()
  assert utils.config_value(config, 'data.image_size', high=256) == 32
  with pytest.raises(ValueError, match=r'config.data.image_size=32 is out of range; allowed: \[1, 16\]'):
    utils.config_value(config, 'data.image_size', high=16)
  with pytest.raises(ValueError, match=r"config.data.num_channels=3 is not allowed; choose one of \(2,\)"):
    utils.config_value(config, 'data.num_channels', allowed=(2,))
  config.training.sde = 'vesde'
  config.model.sigma_min = 60.
  # The VE SDE's own bound, set by another field, on top of the table's rule.
  with pytest.raises(ValueError, match=r'config.model.sigma_max=50 is out of range; allowed: \(60.0, inf\)'):
    sde_lib.sde_from_config(config)


def test_readers_of_a_table_field_refuse_the_same_bad_value():
  config = ml_collections.ConfigDict(cifar10_defaults().to_dict(), type_safe=False)
  config.data.centered = 1
  for reader in (datasets.get_data_scaler, datasets.get_data_inverse_scaler):
    with pytest.raises(ValueError, match=r'config.data.centered=1 is not allowed'):
      reader(config)
