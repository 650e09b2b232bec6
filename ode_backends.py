"""The two solvers of the probability flow ODE behind `likelihood` and the ODE sampler.

`likelihood.get_likelihood_fn` and `sampling.get_ode_sampler` take `backend`:
  - `'scipy'` (their default; Score SDE's path, unchanged): `scipy.integrate.solve_ivp` on the CPU. The state
    is a float64 numpy array, copied to the model's device and back at every function evaluation.
  - `'torch'`: torchdiffeq's adaptive Runge-Kutta solvers, the state a tensor on the data's device; nothing is
    copied to the host but the few scalars that decide each step (accept or reject, next step size).

The torch solvers are the counterparts of scipy's explicit pairs: `method='RK45'` is torchdiffeq's `'dopri5'`
and `'RK23'` its `'bosh3'` (same Butcher tableaus and embedded error estimates). Their step-size control is
scipy's: the error is the RMS over the whole state (the batch and, for the likelihood, the log-density
increments, as one vector) of the error estimate divided by `atol + rtol * max(|y_old|, |y_new|)`; the initial
step is Hairer's estimate; steps change by 0.9 * err^(-1/(order of the estimate + 1)) within [0.2, 10]. So
`rtol` and `atol` mean the same for both backends. The last step is clipped to end exactly at the end of the
interval, as scipy's is (torchdiffeq would otherwise step past it and interpolate: the score would be
evaluated outside [eps, T], where VP's std is not even defined below t = 0). Two details of the step-size
update differ: after a rejection scipy forbids the next accepted step to grow, and after an accepted step
torchdiffeq never shrinks the next one (scipy may, down to 0.9x); so the two take slightly different steps,
and results agree to within the tolerance, not bit for bit. The state is float64, as scipy's (its error control
and the accumulated log-density keep full precision; the state's arithmetic is negligible next to the
network); the model sees the data's dtype. Devices without float64 (Apple's MPS) are not supported.

Solver failure (a step size that underflows, a non-finite state) raises `RuntimeError` naming the time
reached, for both backends.
"""

import torch
import torchdiffeq

BACKENDS = ('scipy', 'torch')
# scipy.integrate.solve_ivp method -> the torchdiffeq solver with the same tableau and error control.
TORCH_METHODS = {'RK45': 'dopri5', 'RK23': 'bosh3'}


def check_backend(backend, method):
  """Raises `ValueError` unless `backend` is one of `BACKENDS` and, for 'torch', `method` has a counterpart.

  For 'scipy', `method` is passed to `scipy.integrate.solve_ivp` as in Score SDE, which checks it.
  """
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not allowed; choose one of {BACKENDS}.')
  if backend == 'torch' and method not in TORCH_METHODS:
    raise ValueError(f"method={method!r} has no torch solver; with backend='torch' choose one of "
                     f"{tuple(TORCH_METHODS)}, or use backend='scipy'.")


# The dtype of the solver's state, as scipy's.
STATE_DTYPE = torch.float64


def failure(t_reached, t_span, nfe, message):
  """The error raised when the solver fails, for both backends."""
  return RuntimeError(f'The probability flow ODE solver failed at t={float(t_reached):.6g} (integrating from '
                      f't={float(t_span[0]):g} to t={float(t_span[1]):g}, after {nfe} function evaluations): '
                      f'{message}')


class _CountedRhs:
  """The right-hand side as torchdiffeq calls it, counting evaluations and recording the last accepted time."""

  def __init__(self, fn, t0, direction):
    self.fn = fn
    self.nfe = 0
    self.direction = direction
    self.t_reached = t0

  def __call__(self, t, y):
    self.nfe += 1
    return self.fn(t, y)

  def callback_accept_step(self, t0, y0, dt):  # pylint: disable=unused-argument
    # torchdiffeq passes t0 in the caller's time direction and dt > 0. Kept on the device: read on failure only.
    self.t_reached = t0 + self.direction * dt


def solve(fn, y0, t_span, rtol, atol, method='RK45'):
  """Solves dy/dt = fn(t, y) from t_span[0] to t_span[1] (either direction) on the device of `y0`.

  Args:
    fn: the right-hand side; gets a 0-dim tensor `t` (the dtype of `y0`) and the state, returns dy/dt of the
      state's shape and dtype.
    y0: the initial state, a tensor (its device and dtype are the solver's).
    t_span: (t0, t1), numbers.
    rtol, atol: tolerances, as scipy's.
    method: a key of `TORCH_METHODS`.

  Returns:
    `(y1, nfe)`: the state at t1 and the number of evaluations of `fn`.

  Raises:
    RuntimeError: the solver failed; the message names the time reached.
  """
  t0, t1 = float(t_span[0]), float(t_span[1])
  rhs = _CountedRhs(fn, t0, 1. if t1 > t0 else -1.)
  t = torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)
  try:
    # step_t=[t1] clips the last step to t1 (see the module docstring).
    ys = torchdiffeq.odeint(rhs, y0, t, rtol=rtol, atol=atol, method=TORCH_METHODS[method],
                            options=dict(step_t=t[1:]))
  except AssertionError as e:
    # torchdiffeq reports failure by assertions: 'underflow in dt ...' (also where the right-hand side is not
    # finite: the step is rejected and shrinks to nothing) or 'non-finite values in state ...' (followed by
    # the whole state: keep the first line).
    message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if message.startswith('underflow in dt'):
      message = f'required step size underflows ({message}); is the model output finite?'
    raise failure(rhs.t_reached, (t0, t1), rhs.nfe, message) from e
  return ys[-1], rhs.nfe
