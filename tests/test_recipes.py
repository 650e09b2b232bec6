"""The ImageNet 32x32 recipe of docs/score_fpe.md (pretrain with DSM, then fine-tune with the FP regularizer in
the same workdir, then evaluate), checked against the config and followed at tiny size."""

import logging
import os
import re

import numpy as np
import pytest

import checkpoints
import run_lib
import utils
from configs.fp import fp_finetuning
from configs.fp import imagenet32_vp_ddpmpp_deep_continuous as recipe
from configs.vp import cifar10_ddpmpp_deep_continuous as base_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _documented_pretraining_flags():
  with open(os.path.join(ROOT, 'docs', 'score_fpe.md')) as f:
    row = next(line for line in f if line.startswith('| `imagenet32_vp_ddpmpp_deep_continuous.py`'))
  return dict(re.findall(r'--config\.([\w.]+)=([^\s`]+)', row))


def test_documented_pretraining_is_the_configs_and_fine_tuning_continues_it():
  overrides = recipe.pretraining_overrides()
  assert _documented_pretraining_flags() == {k: str(v) for k, v in overrides.items()}
  assert overrides['training.n_iters'] == 950001 and overrides['training.snapshot_freq'] == 50000
  config = recipe.get_config()
  # Fine-tuning resumes where pretraining stopped and trains FINE_TUNING_STEPS more (not "nothing to train").
  assert config.training.n_iters == overrides['training.n_iters'] + fp_finetuning.FINE_TUNING_STEPS == 1050001
  # Eval covers exactly the fine-tuned checkpoints (every 5000 steps past 950001), none of pretraining's 1..19.
  assert (config.eval.begin_ckpt, config.eval.end_ckpt) == (191, 210)
  assert overrides['training.n_iters'] // overrides['training.snapshot_freq'] < config.eval.begin_ckpt


# Tiny scale, same arithmetic: pretraining runs k snapshot intervals + 1 step (950001 = 19 * 50000 + 1, here
# 1 * 2 + 1), fine-tuning snapshots more often and runs whole intervals (100000 = 20 * 5000, here 2 * 1).
TINY_PRETRAINING_ITERS, TINY_PRETRAINING_SNAPSHOT = 3, 2
TINY_FINE_TUNING_STEPS, TINY_FINE_TUNING_SNAPSHOT = 2, 1


def _tiny_base_config():
  config = base_module.get_config()
  config.training.n_iters = TINY_PRETRAINING_ITERS
  config.training.snapshot_freq = TINY_PRETRAINING_SNAPSHOT
  model = config.model
  model.nf, model.ch_mult, model.num_res_blocks, model.attn_resolutions = 8, (1, 2), 1, (4,)
  return config


def _tiny_sizes(config, data_path):
  # Sizes only (the step counts stay the recipe's): 8x8 NPZ images, batch 4, the FP term on 1 sample.
  config.data.dataset, config.data.path, config.data.image_size = 'NPZ', data_path, 8
  config.training.batch_size = config.eval.batch_size = 4
  config.training.fp_batch_fraction = 0.25
  config.training.snapshot_sampling = False
  config.training.log_freq = 1
  # Bits/dim (an ODE solve per image) and the residual diagnostic are most of an eval's time at any size, and
  # tests/test_run_lib.py covers them: the eval loss shows which checkpoints eval evaluates.
  config.eval.enable_bpd = False
  config.eval.enable_fp_residual = False
  return config


def test_recipe_followed_at_tiny_size_trains_and_evaluates_the_fine_tuned_checkpoints(tmp_path, monkeypatch,
                                                                                       caplog):
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(recipe, 'get_base_config', _tiny_base_config)
  monkeypatch.setattr(fp_finetuning, 'FINE_TUNING_STEPS', TINY_FINE_TUNING_STEPS)
  monkeypatch.setattr(fp_finetuning, 'SNAPSHOT_FREQ', TINY_FINE_TUNING_SNAPSHOT)
  monkeypatch.setattr(checkpoints, 'CHECKPOINT_WAIT_LIMIT_SECONDS', 0)  # a missing checkpoint fails, never hangs
  rng = np.random.default_rng(0)
  data = str(tmp_path / 'data.npz')
  np.savez(data, train=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
  workdir = str(tmp_path / 'w')
  meta = os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth')

  # Step 1: the config plus the documented overrides, DSM only.
  pretraining = recipe.get_config()
  pretraining.update_from_flattened_dict(recipe.pretraining_overrides())
  run_lib.train(_tiny_sizes(pretraining, data), workdir)
  assert int(checkpoints.load_checkpoint_file(meta)['step']) == TINY_PRETRAINING_ITERS
  assert 'fp_vector' not in caplog.text

  # Step 2: the config unchanged. It resumes, fine-tunes with both FP terms, then evaluates.
  caplog.clear()
  config = _tiny_sizes(recipe.get_config(), data)
  run_lib.train(config, workdir)
  assert f'at step {TINY_PRETRAINING_ITERS}' in caplog.text and 'nothing to train' not in caplog.text
  assert 'fp_vector' in caplog.text and 'fp_scalar' in caplog.text
  final = TINY_PRETRAINING_ITERS + TINY_FINE_TUNING_STEPS
  assert int(checkpoints.load_checkpoint_file(meta)['step']) == final
  ckpts = range(config.eval.begin_ckpt, config.eval.end_ckpt + 1)
  assert list(ckpts) == [4, 5]
  for ckpt in ckpts:  # each is a fine-tuned checkpoint, not one of pretraining's
    path = os.path.join(workdir, 'checkpoints', f'checkpoint_{ckpt}.pth')
    assert int(checkpoints.load_checkpoint_file(path)['step']) > TINY_PRETRAINING_ITERS

  run_lib.evaluate(config, workdir, 'eval')
  for ckpt in ckpts:
    assert os.path.exists(os.path.join(workdir, 'eval', f'ckpt_{ckpt}_loss.npz')), ckpt
  with np.load(os.path.join(workdir, 'eval', f'ckpt_{ckpts[-1]}_loss.npz')) as f:
    assert np.all(np.isfinite(f['all_fp_vector']))
