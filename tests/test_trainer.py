"""The trainer-owned step (trainer.py) and the loss objects under it: accumulation, mixed precision, compile,
the per-step noise, and the term reductions (losses.reduce_term)."""

import copy
import functools
import math

import pytest
import torch

import losses
import run_lib
import sde_lib
import trainer as trainer_lib
import utils
from tests import configs_tiny


# The demo's MLP (2-D data) with the FP regularizer's vector term on, Hutchinson probes, exact d_t s.
_toy_config = configs_tiny.get_toy_fp_config


def _batch(config, n, seed=0):
  generator = torch.Generator().manual_seed(seed)
  return torch.randn((n,) + tuple(run_lib.datasets.get_data(config).sample_shape(n)[1:]), generator=generator)


def _run_steps(config, num_steps, batches):
  """Trains `num_steps` steps; returns the state, the logged terms and the gradients each update used."""
  torch.manual_seed(0)
  sde = sde_lib.sde_from_config(config)
  state = run_lib.build_state(config)
  trainer = run_lib.make_trainer(config, sde, state)
  grads = []
  optimize_fn = trainer.optimize_fn

  def recording_optimize_fn(optimizer, params, step, **kwargs):
    params = list(params)
    grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
    return optimize_fn(optimizer, params, step, **kwargs)

  trainer.optimize_fn = recording_optimize_fn
  logged = [trainer.train_step(state, batch) for batch in batches[:num_steps]]
  return state, logged, grads


def _params(state):
  return torch.cat([p.detach().reshape(-1) for p in state['model'].parameters()])


@pytest.mark.parametrize('k', [2, 4])
def test_accumulation_equals_the_big_batch(k):
  batches = [_batch(_toy_config(), 8, seed) for seed in range(2)]
  big, big_logged, big_grads = _run_steps(_toy_config(), 2, batches)
  acc, acc_logged, acc_grads = _run_steps(_toy_config(grad_accum_steps=k), 2, batches)
  # Same noise (drawn for the whole batch, then split), same weight of each sample: the same gradient up to
  # the float32 rounding of another summation order, at every step.
  for g_acc, g_big in zip(acc_grads, big_grads):
    torch.testing.assert_close(g_acc, g_big, rtol=0, atol=1e-5 * g_big.abs().max().item())
  for name in ('loss', 'dsm', 'fp_vector'):
    torch.testing.assert_close(acc_logged[-1][name], big_logged[-1][name], rtol=1e-5, atol=0)
  # Adam divides by sqrt(v) + eps, which turns rounding in near-zero gradients into differences of up to a
  # fraction of the learning rate (1e-3): the weights agree to that.
  torch.testing.assert_close(_params(acc), _params(big), rtol=0, atol=1e-5)
  # ... and the updates did something: the parameters moved.
  init, _, _ = _run_steps(_toy_config(), 0, batches)
  assert (_params(big) - _params(init)).abs().max() > 1e-4


def test_accumulation_must_divide_the_batch():
  config = _toy_config(grad_accum_steps=3)
  with pytest.raises(ValueError, match='training.grad_accum_steps=3'):
    run_lib.setup_training(config, '/nonexistent-workdir')


def test_step_noise_depends_on_seed_and_step_only():
  config = _toy_config()
  sde = sde_lib.sde_from_config(config)
  loss = losses.loss_from_config(config, sde)
  draw = lambda seed, step: loss.draw_noise((8, 2, 1, 1), 'cpu', torch.float32,
                                            trainer_lib.step_generator(seed, step, 'cpu'))
  a, b, c = draw(42, 7), draw(42, 7), draw(42, 8)
  assert set(a) == {'t', 'z', 'fp_probes'} and a['fp_probes'].shape == (8, 1, 2, 1, 1)
  for name in a:
    torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a[name], c[name])


def test_bf16_trains_float32_weights_and_keeps_the_fp_term_in_float32():
  config = _toy_config(fp_batch_fraction=0.5, beta=0.2, scalar_fp='both')
  batch = _batch(config, 8)
  sde = sde_lib.sde_from_config(config)
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  noise = run_lib.losses.loss_from_config(config, sde).draw_noise(batch.shape, 'cpu', batch.dtype,
                                                                 torch.Generator().manual_seed(3))
  values = {}
  for precision in ('no', 'bf16'):
    config.training.mixed_precision = precision
    trainer = run_lib.make_trainer(config, sde, state)
    values[precision] = trainer.eval_step(state, batch, noise=noise)
  # The regularizer runs in float32 with autocast off: the same numbers to float32 rounding.
  for name in ('fp_vector', 'fp_scalar'):
    torch.testing.assert_close(values['bf16'][name], values['no'][name], rtol=1e-6, atol=0)
  # The DSM loss of the samples outside the FP fraction ran in bfloat16 (8-bit mantissa): close, not equal.
  assert values['bf16']['dsm'] != values['no']['dsm']
  torch.testing.assert_close(values['bf16']['dsm'], values['no']['dsm'], rtol=3e-2, atol=0)

  trainer.train_step(state, batch)
  assert all(p.dtype == torch.float32 for p in state['model'].parameters())
  assert all(p.dtype == torch.float32 for p in state['ema'].shadow_params)
  assert all(torch.isfinite(p).all() for p in state['model'].parameters())


def test_fp16_uses_the_grad_scaler_and_skips_an_overflowing_step():
  config = _toy_config(mixed_precision='fp16')
  config.optim.warmup = 0  # Score SDE's warmup gives step 0 a learning rate of 0
  sde = sde_lib.sde_from_config(config)
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  trainer = run_lib.make_trainer(config, sde, state)
  scaler = trainer.precision.scaler
  assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 2. ** 16
  batch = _batch(config, 8)
  # The scaler starts high and halves on each overflow (a skipped update), until the gradients fit float16.
  moved = False
  for _ in range(20):
    before, scale = _params(state).clone(), scaler.get_scale()
    trainer.train_step(state, batch)
    if torch.equal(_params(state), before):
      assert scaler.get_scale() == scale / 2
    else:
      moved = True
      break
  assert moved
  # A batch whose loss overflows: the update is skipped (weights unchanged) and the scale lowered.
  before, scale = _params(state).clone(), scaler.get_scale()
  trainer.train_step(state, batch * 1e30)
  torch.testing.assert_close(_params(state), before, rtol=0, atol=0)
  assert scaler.get_scale() < scale
  assert all(p.dtype == torch.float32 for p in state['model'].parameters())


@pytest.mark.parametrize('value', ['fp32', 'float16', True])
def test_bad_mixed_precision_is_refused_naming_the_field(value):
  with pytest.raises(ValueError, match=r'config.training.mixed_precision=.*choose one of'):
    trainer_lib.PrecisionPolicy(value)


def test_compile_runs_the_dsm_forward_compiled_and_the_fp_term_eager(monkeypatch):
  # torch.compile's default backend needs minutes of C++ compilation on 2 cores; the 'eager' backend goes
  # through the same tracing and wrapping, which is what this test is about.
  monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
  # Lazy regularization (tests/test_lazy_regularization.py): step 0 has the FP term, step 1 the DSM alone.
  config = _toy_config(compile=True, fp_batch_fraction=0.5, fp_every=2)
  sde = sde_lib.sde_from_config(config)
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  trainer = run_lib.make_trainer(config, sde, state)
  assert trainer.forward_model is not None and trainer.forward_model is not state['model']
  calls = {'compiled': 0, 'eager': 0}
  inner = state['model'].module
  real_forward = type(inner).forward

  def counting_forward(self, x, labels):
    # Under dynamo the compiled module's forward runs traced: count by whether dynamo is compiling.
    calls['compiled' if torch.compiler.is_compiling() else 'eager'] += 1
    return real_forward(self, x, labels)

  monkeypatch.setattr(type(inner), 'forward', counting_forward)
  keys_before = list(state['model'].state_dict())
  terms = trainer.train_step(state, _batch(config, 8))
  assert math.isfinite(terms['loss'].item())
  assert calls['compiled'] >= 1  # the half of the batch outside the FP fraction
  assert calls['eager'] >= 1  # the FP term's evaluation (forward-mode AD gives s and d_t s at once)
  # The checkpoint layout is the DataParallel model's, not the compiled module's ('_orig_mod.').
  assert list(state['model'].state_dict()) == keys_before and all(k.startswith('module.') for k in keys_before)
  # A DSM-only step runs the whole batch through the compiled model alone (one more trace for its shape).
  calls.update(compiled=0, eager=0)
  assert set(trainer.train_step(state, _batch(config, 8, seed=1))) == {'loss', 'dsm'}
  assert calls['compiled'] >= 1 and calls['eager'] == 0


def test_norm_reduction_is_the_released_batch_norm():
  values = torch.tensor([3., 4.])
  # On the whole batch: the L2 norm; on 2 of 8 samples: rescaled by sqrt(8 / 2).
  assert losses.reduce_term(values, 'norm', 2).item() == pytest.approx(5.)
  assert losses.reduce_term(values, 'norm', 8).item() == pytest.approx(10.)
  assert losses.reduce_term(values, 'mean', 8).item() == pytest.approx(3.5)
  with pytest.raises(ValueError, match='Unknown reduction'):
    losses.reduce_term(values, 'max', 2)


def test_norm_reduction_over_ranks_has_the_global_value_and_gradient():
  # Two "ranks" holding halves of a batch of 4: each one's reduced value is the global norm, and the mean of
  # their gradients (what all_reduce_gradients forms) is the gradient of the global norm.
  full = torch.tensor([1., -2., 3., 0.5], dtype=torch.float64, requires_grad=True)
  expected = losses.reduce_term(full, 'norm', 4)
  (expected_grad,) = torch.autograd.grad(expected, full)
  halves = [full.detach()[:2].clone().requires_grad_(True), full.detach()[2:].clone().requires_grad_(True)]
  squares = [h.detach().square().sum() for h in halves]
  grads = []
  for h in halves:
    value = losses.reduce_term(h, 'norm', 2, sum_over_ranks=lambda _: squares[0] + squares[1], world_size=2)
    torch.testing.assert_close(value, expected.detach())
    grads.append(torch.autograd.grad(value, h)[0])
  torch.testing.assert_close(torch.cat(grads) / 2, expected_grad)


def test_loss_reports_its_terms_and_their_weights():
  config = _toy_config(beta=0.25, scalar_fp='both')
  loss = losses.loss_from_config(config, sde_lib.sde_from_config(config))
  assert loss.term_names == ('dsm', 'fp_vector', 'fp_scalar')
  assert loss.weights == {'dsm': 1., 'fp_vector': 0.5, 'fp_scalar': 0.25}
  assert loss.reductions == {'dsm': 'mean', 'fp_vector': 'mean', 'fp_scalar': 'norm'}
  assert 'score-FPE regularizer ON' in loss.describe()
  config.training.alpha = config.training.beta = 0.
  loss = losses.loss_from_config(config, sde_lib.sde_from_config(config))
  assert loss.term_names == ('dsm',)
  assert 'OFF' in loss.describe() and 'configs/fp/' in loss.describe()


def test_score_sde_wrappers_are_the_objects():
  """get_sde_loss_fn and get_step_fn compute what the loss object and the trainer compute."""
  config = _toy_config(beta=0.1, scalar_fp='both')
  sde = sde_lib.sde_from_config(config)
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  batch = _batch(config, 8)
  kwargs = dict(reduce_mean=False, likelihood_weighting=False, alpha=0.5, beta=0.1, fp_divergence='hutchinson',
                fp_time_derivative='forward_ad')
  loss_fn = losses.get_sde_loss_fn(sde, train=False, return_terms=True, **kwargs)
  torch.manual_seed(5)
  wrapped = loss_fn(state['model'], batch)
  loss = losses.loss_from_config(config, sde)
  torch.manual_seed(5)
  reduced = loss.reduce(loss(state['model'], batch, train=False), 8)
  for name in ('dsm', 'fp_vector', 'fp_scalar'):
    torch.testing.assert_close(wrapped[name], reduced[name].detach(), rtol=0, atol=0)
  torch.testing.assert_close(wrapped['loss'], loss.total(reduced), rtol=0, atol=0)

  step_state = copy.deepcopy(state)
  step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config), **kwargs)
  torch.manual_seed(6)
  step_fn(step_state, batch)
  trainer = trainer_lib.Trainer(loss, losses.optimization_manager(config))
  torch.manual_seed(6)
  trainer.train_step(state, batch)
  torch.testing.assert_close(_params(step_state), _params(state), rtol=0, atol=0)
  assert state['step'] == step_state['step'] == 1


def test_eval_step_restores_training_weights_and_flags():
  config = _toy_config()
  sde = sde_lib.sde_from_config(config)
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  trainer = run_lib.make_trainer(config, sde, state)
  trainer.train_step(state, _batch(config, 8))
  before = _params(state).clone()
  flags = [p.requires_grad for p in state['model'].parameters()]
  trainer.eval_step(state, _batch(config, 8, seed=1))
  torch.testing.assert_close(_params(state), before, rtol=0, atol=0)
  assert [p.requires_grad for p in state['model'].parameters()] == flags


def test_seed_for_is_a_fixed_function_of_its_parts():
  assert utils.seed_for(1, 'a', 2) == utils.seed_for(1, 'a', 2)
  assert len({utils.seed_for(1, 'a', 2), utils.seed_for(1, 'a', 3), utils.seed_for(2, 'a', 2),
              utils.seed_for(1, 'b', 2)}) == 4
  # The value does not depend on the process (no salted hash): pinned.
  assert utils.seed_for(42, 'train_step', 0) == utils.seed_for(42, 'train_step', 0) < 2 ** 63
