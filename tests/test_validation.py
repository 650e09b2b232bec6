"""Config validation helpers (utils.check_choice / utils.check_number): errors name the field, the value and
what is allowed."""

import math
import re

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
    (math.nan, {}, r'is not a finite number; allowed: \(-inf, inf\)'),
    (math.nan, dict(allow_inf=True), r'is not a finite number; allowed: \[-inf, inf\]'),
    (math.inf, dict(low=0.), r'is not a finite number; allowed: \[0.0, inf\)'),
    (-math.inf, {}, r'is not a finite number; allowed: \(-inf, inf\)'),
    (np.float32('inf'), dict(low=0.), r'is not a finite number'),
    (-math.inf, dict(low=0., allow_inf=True), r'out of range; allowed: \[0.0, inf\]'),
    (0., dict(low=0., low_open=True), r'out of range; allowed: \(0.0, inf\)'),
    (1., dict(low=0., high=1., high_open=True), r'out of range; allowed: \[0.0, 1.0\)'),
])
def test_check_number_errors(value, kwargs, message):
  with pytest.raises(ValueError, match=f'config.training.x={value!r}.*{message}'):
    utils.check_number('training.x', value, **kwargs)


def test_check_number_takes_inf_only_where_the_caller_allows_it():
  assert utils.check_number('eval.wait_limit_seconds', math.inf, low=0, allow_inf=True) == math.inf
  assert utils.check_number('training.x', 10 ** 400, low=0, integer=True) == 10 ** 400  # exact, not a float


# Every float field of the configs, with the module that validates it before training: inf and NaN are refused
# with the field named (issue 24: training.alpha=inf, optim.lr=inf and optim.eps=inf used to start training).
def _optimizer(config):
  import losses  # pylint: disable=g-import-not-at-top
  return losses.get_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])


def _optimization_manager(config):
  import losses  # pylint: disable=g-import-not-at-top
  return losses.optimization_manager(config)


def _loss(config):
  import losses  # pylint: disable=g-import-not-at-top
  import sde_lib  # pylint: disable=g-import-not-at-top
  return losses.loss_from_config(config, sde_lib.sde_from_config(config))


def _sde(config):
  import sde_lib  # pylint: disable=g-import-not-at-top
  return sde_lib.sde_from_config(config)


def _training_settings(config):
  import run_lib  # pylint: disable=g-import-not-at-top
  return run_lib.training_settings(config)


def _state(config):
  import run_lib  # pylint: disable=g-import-not-at-top
  return run_lib.build_state(config)


def _eval_settings(config):
  import run_lib  # pylint: disable=g-import-not-at-top
  return run_lib.eval_settings(config)


def _model(config):
  from models import utils as mutils  # pylint: disable=g-import-not-at-top
  return mutils.create_model(config)


def _predictor(config):
  import sampling  # pylint: disable=g-import-not-at-top
  return sampling.get_sampling_fn(config, _sde(config), (1, 3, 8, 8), lambda x: x, 1e-3)


FLOAT_FIELDS = [
    ('optim.lr', _optimizer), ('optim.eps', _optimizer), ('optim.beta1', _optimizer),
    ('optim.weight_decay', _optimizer), ('optim.grad_clip', _optimization_manager),
    ('training.alpha', _loss), ('training.beta', _loss), ('training.m', _loss),
    ('training.fp_batch_fraction', _loss), ('training.fp_fd_hs', _loss), ('training.fp_fd_hd', _loss),
    ('model.beta_min', _sde), ('model.beta_max', _sde), ('model.sigma_min', _sde), ('model.sigma_max', _sde),
    ('model.ema_rate', _state), ('model.dropout', _model), ('model.fourier_scale', _model),
    ('model.init_scale', _model), ('sampling.snr', _predictor),
]


@pytest.mark.parametrize('bad', [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize('field, validate', FLOAT_FIELDS)
def test_every_float_field_refuses_inf_and_nan(field, validate, bad):
  from tests import configs_tiny  # pylint: disable=g-import-not-at-top
  # Not type safe: a config file may hold a float where the tiny config has an int (sigma_max = 10).
  config = ml_collections.ConfigDict(configs_tiny.get_config().to_dict(), type_safe=False)
  config.training.sde = 'vpsde' if field.startswith('model.beta') else 'vesde'
  config.sampling.predictor = 'reverse_diffusion'
  section, name = field.split('.')
  getattr(config, section)[name] = bad
  with pytest.raises(ValueError, match=f'config.{re.escape(field)}={bad!r} is (not a finite number|out of range)'):
    validate(config)


@pytest.mark.parametrize('field, value', [('training.max_param_growth', math.inf),
                                          ('eval.wait_limit_seconds', math.inf)])
def test_fields_where_inf_means_no_bound_keep_taking_it(field, value):
  from tests import configs_tiny  # pylint: disable=g-import-not-at-top
  config = configs_tiny.get_config()
  section, name = field.split('.')
  getattr(config, section)[name] = value
  settings = (_training_settings if section == 'training' else _eval_settings)(config)
  assert settings[name] == value
  getattr(config, section)[name] = math.nan
  with pytest.raises(ValueError, match=f'config.{field}=nan is not a finite number'):
    (_training_settings if section == 'training' else _eval_settings)(config)


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


@pytest.mark.parametrize('field', ['training.alpha', 'training.beta'])
def test_fp_weights_have_a_documented_upper_bound(field):
  # alpha=1e30 used to train until a FloatingPointError that blamed optim.lr (issue 24).
  from tests import configs_tiny  # pylint: disable=g-import-not-at-top
  config = configs_tiny.get_config()
  section, name = field.split('.')
  getattr(config, section)[name] = 1e30
  with pytest.raises(ValueError, match=rf'config.{field}=1e\+30 is out of range; allowed: \[0.0, 1000000.0\]'):
    _loss(config)
  getattr(config, section)[name] = 1e6
  _loss(config)
