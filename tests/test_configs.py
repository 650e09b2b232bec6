"""Score SDE's configs: every file loads as `--config` does, carries every default field, builds its SDE and
(for NCSN/NCSNv2, which crash in Score SDE) its model; values spot-checked against Score SDE's files."""

import importlib.util
import os
import sys

import pytest
import torch

import sde_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, 'configs')

# Score SDE PyTorch's experiment configs (commit c8c18d1), relative to configs/.
SCORE_SDE_CONFIGS = (
    'subvp/cifar10_ddpm_continuous.py', 'subvp/cifar10_ddpmpp_continuous.py',
    'subvp/cifar10_ddpmpp_deep_continuous.py', 'subvp/cifar10_ncsnpp_continuous.py',
    'subvp/cifar10_ncsnpp_deep_continuous.py',
    've/bedroom_ncsnpp_continuous.py', 've/celeba_ncsnpp.py', 've/celebahq_256_ncsnpp_continuous.py',
    've/celebahq_ncsnpp_continuous.py', 've/church_ncsnpp_continuous.py', 've/cifar10_ddpm.py',
    've/cifar10_ncsnpp.py', 've/cifar10_ncsnpp_continuous.py', 've/cifar10_ncsnpp_deep_continuous.py',
    've/ffhq_256_ncsnpp_continuous.py', 've/ffhq_ncsnpp_continuous.py',
    've/ncsn/celeba.py', 've/ncsn/celeba_124.py', 've/ncsn/celeba_1245.py', 've/ncsn/celeba_5.py',
    've/ncsn/cifar10.py', 've/ncsn/cifar10_124.py', 've/ncsn/cifar10_1245.py', 've/ncsn/cifar10_5.py',
    've/ncsnv2/bedroom.py', 've/ncsnv2/celeba.py', 've/ncsnv2/cifar10.py',
    'vp/cifar10_ddpmpp.py', 'vp/cifar10_ddpmpp_continuous.py', 'vp/cifar10_ddpmpp_deep_continuous.py',
    'vp/cifar10_ncsnpp.py', 'vp/cifar10_ncsnpp_continuous.py', 'vp/cifar10_ncsnpp_deep_continuous.py',
    'vp/ddpm/bedroom.py', 'vp/ddpm/celebahq.py', 'vp/ddpm/church.py', 'vp/ddpm/cifar10.py',
    'vp/ddpm/cifar10_continuous.py', 'vp/ddpm/cifar10_unconditional.py',
)
DEFAULTS = ('default_cifar10_configs.py', 'default_celeba_configs.py', 'default_lsun_configs.py')
NCSN_CONFIGS = tuple(p for p in SCORE_SDE_CONFIGS if p.startswith(('ve/ncsn/', 've/ncsnv2/')))


def load_module(rel):
  """Loads configs/<rel> from its path with the repo root on sys.path, as ml_collections' config_flags does."""
  assert ROOT in sys.path
  spec = importlib.util.spec_from_file_location(f'_config_{rel.replace("/", "_")[:-3]}', os.path.join(CONFIG_DIR, rel))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(rel):
  return load_module(rel).get_config()


def flat_fields(config):
  """Dotted names of every leaf field of a ConfigDict."""
  out = set()
  for key, value in config.items():
    if hasattr(value, 'items'):
      out |= {f'{key}.{k}' for k in flat_fields(value)}
    else:
      out.add(key)
  return out


def test_every_score_sde_config_is_present():
  found = set()
  for dirpath, _, files in os.walk(CONFIG_DIR):
    rel_dir = os.path.relpath(dirpath, CONFIG_DIR)
    if rel_dir.split(os.sep)[0] in ('fp', 'toy', 'digits', '__pycache__') or rel_dir == '.':
      continue
    found |= {os.path.join(rel_dir, f).replace(os.sep, '/') for f in files if f.endswith('.py')}
  assert found == set(SCORE_SDE_CONFIGS)
  for name in DEFAULTS + ('fp_defaults.py',):
    assert os.path.isfile(os.path.join(CONFIG_DIR, name))


def test_defaults_share_fields_including_the_fp_diffusion_block():
  fields = [flat_fields(load_module(name).get_default_configs()) for name in DEFAULTS]
  assert fields[0] == fields[1] == fields[2]
  for field in ('training.alpha', 'training.beta', 'training.scalar_fp', 'training.fp_wgt_type', 'training.m',
                'training.fp_dist', 'eval.bpd_num_repeats', 'eval.enable_fp_residual', 'eval.fp_residual_num_times',
                'eval.fp_residual_num_batches', 'eval.inception_model', 'eval.stats_path', 'data.data_dir',
                'data.path', 'data.num_channels', 'device', 'seed'):
    assert field in fields[0]


@pytest.mark.parametrize('rel', SCORE_SDE_CONFIGS)
def test_config_loads_has_default_fields_and_builds_sde(rel):
  config = load_config(rel)
  default_fields = flat_fields(load_module('default_cifar10_configs.py').get_default_configs())
  missing = default_fields - flat_fields(config)
  assert not missing, f'{rel} lacks {sorted(missing)}'
  for field in ('training.sde', 'model.name', 'model.ema_rate', 'model.nf', 'model.normalization',
                'sampling.method', 'sampling.predictor', 'sampling.corrector'):
    assert field in flat_fields(config), f'{rel} lacks {field}'
  # The FP-Diffusion regularizer is off in Score SDE's configs: they train exactly as in Score SDE.
  assert config.training.alpha == 0 and config.training.beta == 0
  expected_device = 'cuda' if torch.cuda.is_available() else 'cpu'
  assert config.device.type == expected_device

  sde = sde_lib.sde_from_config(config)
  expected = {'vesde': sde_lib.VESDE, 'vpsde': sde_lib.VPSDE, 'subvpsde': sde_lib.subVPSDE}[config.training.sde]
  assert type(sde) is expected  # pylint: disable=unidiomatic-typecheck
  assert sde.N == config.model.num_scales
  if expected is sde_lib.VESDE:
    assert sde.sigma_max == config.model.sigma_max and sde.sigma_min == config.model.sigma_min
  else:
    assert sde.beta_0 == config.model.beta_min and sde.beta_1 == config.model.beta_max


# (config, field, Score SDE's value), read from Score SDE PyTorch's files at commit c8c18d1.
SPOT_CHECKS = [
    ('ve/cifar10_ncsnpp_continuous.py', 'model.name', 'ncsnpp'),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.fir', True),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.nf', 128),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.ch_mult', (1, 2, 2, 2)),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.num_res_blocks', 4),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.sigma_max', 50),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.progressive_input', 'residual'),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.embedding_type', 'fourier'),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.fourier_scale', 16),
    ('ve/cifar10_ncsnpp_continuous.py', 'model.ema_rate', 0.999),
    ('ve/cifar10_ncsnpp_continuous.py', 'sampling.predictor', 'reverse_diffusion'),
    ('ve/cifar10_ncsnpp_continuous.py', 'sampling.corrector', 'langevin'),
    ('ve/cifar10_ncsnpp_continuous.py', 'sampling.snr', 0.16),
    ('ve/cifar10_ncsnpp_continuous.py', 'training.n_iters', 1300001),
    ('ve/cifar10_ncsnpp_deep_continuous.py', 'model.num_res_blocks', 8),
    ('ve/cifar10_ncsnpp_deep_continuous.py', 'training.n_iters', 950001),
    ('ve/cifar10_ncsnpp.py', 'training.continuous', False),
    ('ve/cifar10_ncsnpp.py', 'model.embedding_type', 'positional'),
    ('vp/cifar10_ddpmpp_continuous.py', 'training.sde', 'vpsde'),
    ('vp/cifar10_ddpmpp_continuous.py', 'training.reduce_mean', True),
    ('vp/cifar10_ddpmpp_continuous.py', 'data.centered', True),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.fir', False),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.progressive_input', 'none'),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.embedding_type', 'positional'),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.ema_rate', 0.9999),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.scale_by_sigma', False),
    ('vp/cifar10_ddpmpp_continuous.py', 'sampling.predictor', 'euler_maruyama'),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.beta_min', 0.1),
    ('vp/cifar10_ddpmpp_continuous.py', 'model.beta_max', 20.),
    ('vp/cifar10_ddpmpp.py', 'sampling.predictor', 'ancestral_sampling'),
    ('vp/cifar10_ncsnpp.py', 'sampling.predictor', 'reverse_diffusion'),
    ('subvp/cifar10_ddpm_continuous.py', 'training.sde', 'subvpsde'),
    ('ve/ncsn/cifar10.py', 'model.name', 'ncsn'),
    ('ve/ncsn/cifar10.py', 'model.sigma_max', 1),
    ('ve/ncsn/cifar10.py', 'model.num_scales', 10),
    ('ve/ncsn/cifar10.py', 'model.ema_rate', 0.),
    ('ve/ncsn/cifar10.py', 'model.normalization', 'InstanceNorm++'),
    ('ve/ncsn/cifar10.py', 'model.nonlinearity', 'elu'),
    ('ve/ncsn/cifar10.py', 'model.interpolation', 'bilinear'),
    ('ve/ncsn/cifar10.py', 'sampling.corrector', 'ald'),
    ('ve/ncsn/cifar10.py', 'sampling.predictor', 'none'),
    ('ve/ncsn/cifar10.py', 'sampling.n_steps_each', 100),
    ('ve/ncsn/cifar10.py', 'sampling.snr', 0.316),
    ('ve/ncsn/cifar10.py', 'optim.lr', 1e-3),
    ('ve/ncsn/cifar10.py', 'optim.grad_clip', -1.),
    ('ve/ncsn/cifar10.py', 'optim.warmup', 0),
    ('ve/ncsn/cifar10_124.py', 'model.num_scales', 232),
    ('ve/ncsn/celeba_124.py', 'model.num_scales', 500),
    ('ve/ncsn/celeba_124.py', 'sampling.snr', 0.128),
    ('ve/ncsn/celeba.py', 'training.sde', 'vesde'),  # Score SDE's file misnames it training.loss
    ('ve/ncsnv2/cifar10.py', 'model.name', 'ncsnv2_64'),
    ('ve/ncsnv2/cifar10.py', 'optim.lr', 1e-4),
    ('ve/ncsnv2/bedroom.py', 'model.name', 'ncsnv2_128'),
    ('ve/ncsnv2/bedroom.py', 'model.sigma_max', 190),
    ('ve/ncsnv2/bedroom.py', 'model.num_scales', 1086),
    ('ve/ncsnv2/bedroom.py', 'data.image_size', 128),
    ('ve/ncsnv2/bedroom.py', 'training.batch_size', 128),
    ('ve/ncsnv2/bedroom.py', 'training.continuous', False),  # Score SDE's file misspells it continuouse
    ('ve/celebahq_ncsnpp_continuous.py', 'data.image_size', 1024),
    ('ve/celebahq_ncsnpp_continuous.py', 'model.nf', 16),
    ('ve/celebahq_ncsnpp_continuous.py', 'model.ch_mult', (1, 2, 4, 8, 16, 32, 32, 32)),
    ('ve/celebahq_ncsnpp_continuous.py', 'model.sigma_max', 1348),
    ('ve/celebahq_ncsnpp_continuous.py', 'training.batch_size', 8),
    ('ve/ffhq_ncsnpp_continuous.py', 'training.reduce_mean', True),
    ('ve/celebahq_256_ncsnpp_continuous.py', 'model.sigma_max', 348),
    ('ve/church_ncsnpp_continuous.py', 'model.sigma_max', 380),
    ('ve/church_ncsnpp_continuous.py', 'data.category', 'church_outdoor'),
    ('ve/bedroom_ncsnpp_continuous.py', 'model.sigma_max', 378),
    ('ve/bedroom_ncsnpp_continuous.py', 'model.progressive', 'output_skip'),
    ('ve/bedroom_ncsnpp_continuous.py', 'model.num_scales', 2000),
    ('ve/bedroom_ncsnpp_continuous.py', 'sampling.snr', 0.075),
    ('ve/celeba_ncsnpp.py', 'model.sigma_max', 90.),
    ('ve/celeba_ncsnpp.py', 'sampling.snr', 0.17),
    ('vp/ddpm/celebahq.py', 'optim.lr', 2e-5),
    ('vp/ddpm/celebahq.py', 'model.ch_mult', (1, 1, 2, 2, 4, 4)),
    ('vp/ddpm/celebahq.py', 'data.dataset', 'CelebAHQ'),
    ('vp/ddpm/celebahq.py', 'data.image_size', 256),
    ('vp/ddpm/cifar10_unconditional.py', 'model.conditional', False),
]


@pytest.mark.parametrize('rel,field,value', SPOT_CHECKS)
def test_values_match_score_sde(rel, field, value):
  node = load_config(rel)
  for part in field.split('.'):
    node = node[part]
  assert node == value and type(node) is type(value), f'{rel}: config.{field} = {node!r}, Score SDE has {value!r}'


def _import_models():
  try:
    import models  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from models import utils as mutils  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f'models/ cannot be imported yet ({e}); the NCSN/NCSNv2 build check needs it')
  return mutils


@pytest.mark.parametrize('rel', NCSN_CONFIGS)
def test_ncsn_configs_build_a_model(rel):
  """Score SDE's NCSN/NCSNv2 configs crash there (`config.data.channels`); here they build and run.

  The architecture is built with nf=8 so that a forward pass is quick on CPU; every other field is the config's.
  """
  mutils = _import_models()
  config = load_config(rel)
  config.model.nf = 8
  config.device = torch.device('cpu')
  model = mutils.create_model(config)
  # As in Score SDE: NCSNv2's sigmas are a persistent buffer ('module.sigmas'); NCSN (v1) has none.
  sigma_keys = [key for key in model.state_dict() if 'sigmas' in key]
  assert sigma_keys == (['module.sigmas'] if config.model.name.startswith('ncsnv2') else [])
  sde = sde_lib.sde_from_config(config)
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=config.training.continuous)
  size = config.data.image_size
  x = torch.randn(1, config.data.num_channels, size, size)
  with torch.no_grad():
    score = score_fn(x, torch.full((1,), 0.5))
  assert score.shape == x.shape and torch.isfinite(score).all()


FP_CONFIGS = {
    'fp/cifar10_ve_ncsnpp_continuous.py': 've/cifar10_ncsnpp_continuous.py',
    'fp/cifar10_vp_ddpmpp_continuous.py': 'vp/cifar10_ddpmpp_continuous.py',
    'fp/cifar10_vp_ddpmpp_deep_continuous.py': 'vp/cifar10_ddpmpp_deep_continuous.py',
    'fp/cifar10_subvp_ddpmpp_continuous.py': 'subvp/cifar10_ddpmpp_continuous.py',
    'fp/cifar10_subvp_ddpmpp_deep_continuous.py': 'subvp/cifar10_ddpmpp_deep_continuous.py',
    'fp/imagenet32_vp_ddpmpp_deep_continuous.py': 'vp/cifar10_ddpmpp_deep_continuous.py',
}


def test_every_fp_config_is_listed():
  present = {f'fp/{name}' for name in os.listdir(os.path.join(CONFIG_DIR, 'fp'))
             if name.endswith('.py') and name != 'fp_finetuning.py'}
  assert present == set(FP_CONFIGS)


@pytest.mark.parametrize('rel', sorted(FP_CONFIGS))
def test_fp_configs_fine_tune_their_base_with_the_papers_values(rel):
  import losses
  config, base = load_config(rel), load_config(FP_CONFIGS[rel])
  # The architecture and SDE are the base's, so its released checkpoint fits.
  assert config.model.to_dict() == base.model.to_dict()
  assert config.training.sde == base.training.sde and config.training.continuous
  t = config.training
  assert (t.batch_size, t.likelihood_weighting, t.scalar_fp, t.fp_wgt_type, t.alpha, t.beta, t.m, t.fp_dist) == \
      (48, True, 'both', 'll', 0.15, 0.01, 2, 'pert')
  # Every training field the loss reads is valid: the loss builds, with both FP terms on.
  loss = losses.loss_from_config(config, sde_lib.sde_from_config(config))
  assert loss.term_names == ('dsm', 'fp_vector', 'fp_scalar')
  # Fine-tuning continues past the base's steps; warmup stays the base's, so optim.lr applies every step.
  assert t.n_iters > base.training.n_iters and config.optim.warmup == base.optim.warmup


def test_fp_eval_range_follows_overrides_of_n_iters_and_snapshot_freq():
  config = load_config('fp/cifar10_ve_ncsnpp_continuous.py')
  pretrained = load_config('ve/cifar10_ncsnpp_continuous.py').training.n_iters
  freq = config.training.snapshot_freq
  assert config.eval.begin_ckpt == pretrained // freq + 1
  assert config.eval.end_ckpt == config.training.n_iters // freq
  # As `--config.training.n_iters=1350000` does: the last checkpoint written is checkpoint_{n_iters // freq}.
  config.training.n_iters = 1350000
  assert (config.eval.begin_ckpt, config.eval.end_ckpt) == (pretrained // freq + 1, 270)
  config.training.snapshot_freq = 10000
  assert (config.eval.begin_ckpt, config.eval.end_ckpt) == (pretrained // 10000 + 1, 135)
  # An explicit range wins.
  config.eval.end_ckpt = 131
  assert config.eval.end_ckpt == 131 and config.training.n_iters == 1350000
