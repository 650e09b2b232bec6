"""The line training logs at its start says whether the score-FPE regularizer is on, with its settings, and,
when it is off, names the FP-Diffusion recipes (a FP-Diffusion command ported to a Score SDE config is DSM)."""

import logging
import os

import numpy as np
import pytest

import run_lib
import score_fpe
from tests import configs_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_lines(tmp_path, caplog, **training):
  config = configs_tiny.get_config()
  rng = np.random.default_rng(0)
  config.data.path = str(tmp_path / 'data.npz')
  np.savez(config.data.path, train=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
  config.training.n_iters = 0  # a fresh run at step 0: logs its start, then "nothing to train"
  config.training.update(training)
  with caplog.at_level(logging.INFO):
    run_lib.train(config, str(tmp_path / 'w'))
  assert 'nothing to train' in caplog.text
  return [r.getMessage() for r in caplog.records if 'score-FPE regularizer' in r.getMessage()]


def test_regularizer_off_is_said_once_and_names_every_recipe(tmp_path, caplog):
  lines = _start_lines(tmp_path, caplog, alpha=0., beta=0.)
  assert len(lines) == 1
  line = lines[0]
  assert 'score-FPE regularizer OFF' in line and 'training.alpha=0, training.beta=0' in line
  assert 'plain DSM' in line
  recipes = sorted(f'configs/fp/{n}' for n in os.listdir(os.path.join(ROOT, 'configs', 'fp'))
                   if n.endswith('.py') and n != 'fp_finetuning.py')
  assert score_fpe.fp_recipes() == tuple(recipes) and len(recipes) >= 6
  assert all(recipe in line for recipe in recipes)


@pytest.mark.parametrize('training, settings', [
    (dict(alpha=0.15, beta=0.01), ("alpha=0.15 (vector term on)", "beta=0.01 (scalar term on)",
                                   "time derivative 'finite_difference' (dropout masks 'shared')")),
    (dict(alpha=0.1, beta=0., fp_dropout_masks='independent'),
     ("alpha=0.1 (vector term on)", "beta=0 (scalar term off)", "(dropout masks 'independent')")),
])
def test_regularizer_on_is_said_once_with_its_settings(tmp_path, caplog, training, settings):
  lines = _start_lines(tmp_path, caplog, **training)
  assert len(lines) == 1
  assert 'score-FPE regularizer ON' in lines[0] and 'configs/fp/' not in lines[0]
  for setting in settings:
    assert setting in lines[0], (setting, lines[0])
