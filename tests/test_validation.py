"""Config validation helpers (utils.check_choice / utils.check_number): errors name the field, the value and
what is allowed."""

import math

import ml_collections
import numpy as np
import pytest
import torch

import datasets
import utils
from configs.default_cifar10_configs import get_default_configs


def test_check_choice_returns_allowed_values_and_names_the_field():
  assert utils.check_choice('training.scalar_fp', 'both', ('False', 'True', 'both')) == 'both'
  with pytest.raises(ValueError, match=r"config.training.scalar_fp='Both' is not allowed; choose one of "
                                       r"\('False', 'True', 'both'\)"):
    utils.check_choice('training.scalar_fp', 'Both', ('False', 'True', 'both'))


@pytest.mark.parametrize('value', [1, 0, 1.0, 0.0, 'True', 'False', None])
def test_boolean_fields_take_only_bools(value):
  # 1 == True in Python: a plain `in` test would accept these.
  with pytest.raises(ValueError, match=r'config.data.random_flip=.* is not allowed'):
    utils.check_choice('data.random_flip', value, (True, False))
  assert utils.check_choice('data.random_flip', False, (True, False)) is False


@pytest.mark.parametrize('value', [1, 0, 1.0, 'True', None])
def test_check_bool(value):
  with pytest.raises(ValueError, match=r'config.training.continuous=.* is not allowed; choose one of \(True, False\)'):
    utils.check_bool('training.continuous', value)
  assert utils.check_bool('training.continuous', True) is True
  assert utils.check_bool('training.continuous', np.bool_(False)) is False


def test_number_choices_do_not_take_bools():
  with pytest.raises(ValueError, match='config.data.num_channels=True'):
    utils.check_choice('data.num_channels', True, (1, 3))
  assert utils.check_choice('data.num_channels', 3, (1, 3)) == 3


@pytest.mark.parametrize('value, kwargs, message', [
    (True, {}, 'must be a real number'),
    ('0.1', {}, 'must be a real number'),
    (1.5, dict(integer=True), 'must be an integer'),
    (math.nan, {}, r'out of range; allowed: \[-inf, inf\]'),
    (0., dict(low=0., low_open=True), r'out of range; allowed: \(0.0, inf\]'),
    (1., dict(low=0., high=1., high_open=True), r'out of range; allowed: \[0.0, 1.0\)'),
])
def test_check_number_errors(value, kwargs, message):
  with pytest.raises(ValueError, match=f'config.training.x={value!r}.*{message}'):
    utils.check_number('training.x', value, **kwargs)


def test_scalers_validate_data_centered():
  config = get_default_configs()
  x = torch.tensor([0., 0.5, 1.])
  config.data.centered = True
  torch.testing.assert_close(datasets.get_data_scaler(config)(x), torch.tensor([-1., 0., 1.]))
  config.data.centered = False
  torch.testing.assert_close(datasets.get_data_scaler(config)(x), x)
  # A truthy string (as a hand-written config may hold): it would silently center the data.
  bad = ml_collections.ConfigDict({'data': {'centered': 'False'}})
  for make in (datasets.get_data_scaler, datasets.get_data_inverse_scaler):
    with pytest.raises(ValueError, match=r"config.data.centered='False' is not allowed"):
      make(bad)
