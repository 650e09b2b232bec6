"""ExponentialMovingAverage: Score SDE's update formula, warm-up, store/restore, copy_to and state dicts."""

import pytest
import torch

from models.ema import ExponentialMovingAverage, ema_weights


def _model():
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
  # A frozen parameter (like NCSN++'s Fourier features) is not averaged.
  model.register_parameter('frozen', torch.nn.Parameter(torch.ones(5), requires_grad=False))
  return model


def _trainable(model):
  return [p for p in model.parameters() if p.requires_grad]


def _perturb(model, scale):
  with torch.no_grad():
    for p in _trainable(model):
      p.add_(scale * torch.randn_like(p))


def test_update_formula_with_warmup():
  model = _model()
  ema = ExponentialMovingAverage(model.parameters(), decay=0.999)
  assert len(ema.shadow_params) == len(_trainable(model))
  expected = [p.detach().clone() for p in _trainable(model)]
  for n in range(1, 4):
    _perturb(model, 1.)
    ema.update(model.parameters())
    decay = min(0.999, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, 4/13
    expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, _trainable(model))]
    assert ema.num_updates == n
    for s, e in zip(ema.shadow_params, expected):
      torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)


def test_update_without_num_updates_uses_plain_decay():
  model = _model()
  ema = ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False)
  before = [p.detach().clone() for p in _trainable(model)]
  _perturb(model, 1.)
  ema.update(model.parameters())
  assert ema.num_updates is None
  for s, b, p in zip(ema.shadow_params, before, _trainable(model)):
    torch.testing.assert_close(s, 0.9 * b + 0.1 * p.detach())


def test_store_copy_to_restore():
  model = _model()
  ema = ExponentialMovingAverage(model.parameters(), decay=0.5)
  _perturb(model, 1.)
  ema.update(model.parameters())
  current = [p.detach().clone() for p in model.parameters()]
  ema.store(model.parameters())
  ema.copy_to(model.parameters())
  for s, p in zip(ema.shadow_params, _trainable(model)):
    assert torch.equal(s, p.detach())
  assert not torch.equal(_trainable(model)[0].detach(), current[0])
  ema.restore(model.parameters())
  for c, p in zip(current, model.parameters()):
    assert torch.equal(c, p.detach())


def test_state_dict_round_trip():
  model = _model()
  ema = ExponentialMovingAverage(model.parameters(), decay=0.99)
  for _ in range(3):
    _perturb(model, 1.)
    ema.update(model.parameters())
  state = ema.state_dict()
  assert set(state) == {'decay', 'num_updates', 'shadow_params'}
  other = ExponentialMovingAverage(_model().parameters(), decay=0.5, use_num_updates=False)
  other.load_state_dict(state)
  assert other.decay == 0.99 and other.num_updates == 3
  for a, b in zip(other.shadow_params, ema.shadow_params):
    assert torch.equal(a, b)
  # The loaded state continues identically.
  _perturb(model, 1.)
  ema.update(model.parameters())
  other.update(model.parameters())
  for a, b in zip(other.shadow_params, ema.shadow_params):
    assert torch.equal(a, b)


def test_load_state_dict_rejects_mismatch():
  ema = ExponentialMovingAverage(_model().parameters(), decay=0.9)
  state = ema.state_dict()
  with pytest.raises(ValueError, match='4 trainable'):
    ema.load_state_dict(dict(state, shadow_params=state['shadow_params'][:-1]))
  bad = list(state['shadow_params'])
  bad[0] = torch.zeros(7, 7)
  with pytest.raises(ValueError, match='shapes'):
    ema.load_state_dict(dict(state, shadow_params=bad))
  with pytest.raises(ValueError, match='missing'):
    ema.load_state_dict({'decay': 0.9})


def test_bad_decay_and_wrong_parameters():
  with pytest.raises(ValueError, match='Decay'):
    ExponentialMovingAverage(_model().parameters(), decay=1.5)
  ema = ExponentialMovingAverage(_model().parameters(), decay=0.9)
  with pytest.raises(ValueError, match='trainable parameters'):
    ema.update(torch.nn.Linear(3, 3).parameters())


@pytest.mark.parametrize('freeze_grads', [True, False])
def test_ema_weights_swaps_in_the_average_and_puts_back_the_training_weights(freeze_grads):
  model = _model()
  ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
  _perturb(model, 1.)
  training = [p.detach().clone() for p in model.parameters()]
  flags = [p.requires_grad for p in model.parameters()]
  assert any(flags)
  state = {'model': model, 'ema': ema}
  with ema_weights(state, freeze_grads=freeze_grads):
    for p, s in zip(_trainable(model), ema.shadow_params):
      assert torch.equal(p, s)
    # Frozen: no parameter graph in the body. Not frozen: the flags untouched (a compiled model keeps its graph).
    assert [p.requires_grad for p in model.parameters()] == ([False] * len(flags) if freeze_grads else flags)
  for p, q in zip(model.parameters(), training):
    assert torch.equal(p, q)
  assert [p.requires_grad for p in model.parameters()] == flags
  # Also when the body raises.
  with pytest.raises(RuntimeError):
    with ema_weights(state, freeze_grads=freeze_grads):
      raise RuntimeError('body failed')
  assert [p.requires_grad for p in model.parameters()] == flags
  for p, q in zip(model.parameters(), training):
    assert torch.equal(p, q)
