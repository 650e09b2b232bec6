"""Controllable generation with Predictor-Corrector samplers (Song et al., ICLR 2021, Section 5 and App. I):
inpainting, colorization and class-conditional sampling.

Names and signatures are Score SDE's. Deliberate differences from the released code:
  - after each inpainting/colorization update, `x_mean` combines the update's own `x_mean` with the known
    part (the released code combines the already-noised `x`, so "denoised" outputs kept the last step's
    noise in the unknown part);
  - the colorizer's initial sample masks the prior sample in the decoupled space, where the mask lives (the
    released code masks it before decoupling, which mixes prior noise into the gray channel);
  - `get_pc_conditional_sampler` takes a PyTorch classifier; see its docstring.
"""

import torch

import sde_lib
import utils
from models import utils as mutils
from sampling import NoneCorrector, NonePredictor, get_pc_update_fns


def get_pc_inpainter(sde, predictor, corrector, inverse_scaler, snr,
                     n_steps=1, probability_flow=False, continuous=False,
                     denoise=True, eps=1e-5):
  """Create an image inpainting function that uses PC samplers.

  After every predictor and corrector update, the known entries are replaced by a sample of the forward
  perturbation kernel p_t(x(t) | data) (Appendix I.2).

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    predictor: A subclass of `sampling.Predictor` that represents a predictor algorithm.
    corrector: A subclass of `sampling.Corrector` that represents a corrector algorithm.
    inverse_scaler: The inverse data normalizer.
    snr: A `float` number. The signal-to-noise ratio for the corrector.
    n_steps: An integer. The number of corrector steps per update of the corrector.
    probability_flow: If `True`, predictor solves the probability flow ODE for sampling.
    continuous: `True` indicates that the score-based model was trained with continuous time.
    denoise: If `True`, add one-step denoising to final samples.
    eps: A `float` number. The reverse-time SDE/ODE is integrated to `eps` for numerical stability.

  Returns:
    An inpainting function `pc_inpainter(model, data, mask)`.
  """
  sde_lib.check_eps(sde, eps)
  predictor_update_fn, corrector_update_fn = get_pc_update_fns(sde, predictor, corrector, snr, n_steps,
                                                               probability_flow, continuous)

  def get_inpaint_update_fn(update_fn):
    """Modify the update function of predictor & corrector to incorporate data information."""

    def inpaint_update_fn(model, data, mask, x, t):
      vec_t = torch.ones(data.shape[0], device=data.device) * t
      x, x_mean = update_fn(x, vec_t, model=model)
      masked_data_mean, std = sde.marginal_prob(data, vec_t)
      masked_data = masked_data_mean + utils.batch_mul(std, torch.randn_like(x))
      x = x * (1. - mask) + masked_data * mask
      x_mean = x_mean * (1. - mask) + masked_data_mean * mask
      return x, x_mean

    return inpaint_update_fn

  projector_inpaint_update_fn = get_inpaint_update_fn(predictor_update_fn)
  corrector_inpaint_update_fn = get_inpaint_update_fn(corrector_update_fn)

  def pc_inpainter(model, data, mask):
    """Predictor-Corrector (PC) sampler for image inpainting.

    Args:
      model: A score model.
      data: A PyTorch tensor that represents a mini-batch of images to inpaint (scaled data).
      mask: A 0-1 tensor with the same shape of `data`. Value `1` marks known pixels,
        and value `0` marks pixels that require inpainting.

    Returns:
      Inpainted (complete) images.
    """
    with torch.no_grad():
      # Initial sample
      x = data * mask + sde.prior_sampling(data.shape).to(data.device) * (1. - mask)
      x_mean = x
      timesteps = torch.linspace(sde.T, eps, sde.N, device=data.device)
      for i in range(sde.N):
        t = timesteps[i]
        x, x_mean = corrector_inpaint_update_fn(model, data, mask, x, t)
        x, x_mean = projector_inpaint_update_fn(model, data, mask, x, t)

      return inverse_scaler(x_mean if denoise else x)

  return pc_inpainter


# `_M` is an orthonormal matrix that decouples RGB into a space where the gray-scale image occupies the first
# channel (its first column is (1, 1, 1) / sqrt(3)). Score SDE's values.
_M = torch.tensor([[5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
                   [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
                   [5.7735026e-01, 4.0824822e-01, -7.0710683e-01]])


def decouple(inputs):
  """Maps images (B, 3, H, W) to the decoupled space, where channel 0 is the gray-scale image."""
  return torch.einsum('bihw,ij->bjhw', inputs, _M.to(device=inputs.device, dtype=inputs.dtype))


def couple(inputs):
  """The inverse of `decouple`."""
  inv_m = torch.inverse(_M.double()).to(device=inputs.device, dtype=inputs.dtype)
  return torch.einsum('bihw,ij->bjhw', inputs, inv_m)


def _gray_mask(image):
  """1 on the decoupled gray channel, 0 on the two color channels."""
  return torch.cat([torch.ones_like(image[:, :1, ...]), torch.zeros_like(image[:, 1:, ...])], dim=1)


def get_pc_colorizer(sde, predictor, corrector, inverse_scaler,
                     snr, n_steps=1, probability_flow=False, continuous=False,
                     denoise=True, eps=1e-5):
  """Create a image colorization function based on Predictor-Corrector (PC) sampling.

  Colorization is inpainting in the decoupled space of `decouple`, where the gray channel is known.

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    predictor: A subclass of `sampling.Predictor` that represents a predictor algorithm.
    corrector: A subclass of `sampling.Corrector` that represents a corrector algorithm.
    inverse_scaler: The inverse data normalizer.
    snr: A `float` number. The signal-to-noise ratio for correctors.
    n_steps: An integer. The number of corrector steps per update of the predictor.
    probability_flow: If `True`, solve the probability flow ODE for sampling with the predictor.
    continuous: `True` indicates that the score-based model was trained with continuous time steps.
    denoise: If `True`, add one-step denoising to final samples.
    eps: A `float` number. The SDE/ODE will start from `eps` to avoid numerical stabilities.

  Returns:
    A colorization function `pc_colorizer(model, gray_scale_img)`.
  """
  sde_lib.check_eps(sde, eps)
  predictor_update_fn, corrector_update_fn = get_pc_update_fns(sde, predictor, corrector, snr, n_steps,
                                                               probability_flow, continuous)

  def get_colorization_update_fn(update_fn):
    """Modify update functions of predictor & corrector to incorporate information of gray-scale images."""

    def colorization_update_fn(model, gray_scale_img, x, t):
      mask = _gray_mask(x)
      vec_t = torch.ones(x.shape[0], device=x.device) * t
      x, x_mean = update_fn(x, vec_t, model=model)
      masked_data_mean, std = sde.marginal_prob(decouple(gray_scale_img), vec_t)
      masked_data = masked_data_mean + utils.batch_mul(std, torch.randn_like(x))
      x = couple(decouple(x) * (1. - mask) + masked_data * mask)
      x_mean = couple(decouple(x_mean) * (1. - mask) + masked_data_mean * mask)
      return x, x_mean

    return colorization_update_fn

  predictor_colorize_update_fn = get_colorization_update_fn(predictor_update_fn)
  corrector_colorize_update_fn = get_colorization_update_fn(corrector_update_fn)

  def pc_colorizer(model, gray_scale_img):
    """Colorize gray-scale images using Predictor-Corrector (PC) sampler.

    Args:
      model: A score model.
      gray_scale_img: A minibatch of gray-scale images, (B, 3, H, W), scaled data. Their R,G,B channels have
        the same values.

    Returns:
      Colorized images.
    """
    if gray_scale_img.dim() != 4 or gray_scale_img.shape[1] != 3:
      raise ValueError(f'Colorization needs images of shape (B, 3, H, W); got {tuple(gray_scale_img.shape)}.')
    with torch.no_grad():
      shape = gray_scale_img.shape
      mask = _gray_mask(gray_scale_img)
      # Initial sample
      prior = sde.prior_sampling(shape).to(gray_scale_img.device)
      x = couple(decouple(gray_scale_img) * mask + decouple(prior) * (1. - mask))
      x_mean = x
      timesteps = torch.linspace(sde.T, eps, sde.N, device=gray_scale_img.device)
      for i in range(sde.N):
        t = timesteps[i]
        x, x_mean = corrector_colorize_update_fn(model, gray_scale_img, x, t)
        x, x_mean = predictor_colorize_update_fn(model, gray_scale_img, x, t)

      return inverse_scaler(x_mean if denoise else x)

  return pc_colorizer


def get_classifier_grad_fn(classifier):
  """Returns `grad_fn(x, noise_scale, labels)` = d/dx log softmax(classifier(x, noise_scale))[labels]."""

  def grad_fn(x, noise_scale, labels):
    with torch.enable_grad():
      x = x.detach().requires_grad_(True)
      logits = classifier(x, noise_scale)
      if logits.dim() != 2 or labels.shape != (x.shape[0],):
        # gather would silently guide only the first len(labels) samples.
        raise ValueError(f'The classifier gave logits of shape {tuple(logits.shape)} and the labels have shape '
                         f'{tuple(labels.shape)}; expected ({x.shape[0]}, num_classes) and ({x.shape[0]},).')
      log_probs = torch.log_softmax(logits, dim=-1)
      selected = log_probs.gather(1, labels.long().reshape(-1, 1)).sum()
      return torch.autograd.grad(selected, x)[0]

  return grad_fn


def get_pc_conditional_sampler(sde, classifier, shape,
                               predictor, corrector, inverse_scaler, snr,
                               n_steps=1, probability_flow=False,
                               continuous=False, denoise=True, eps=1e-5, device='cuda'):
  """Class-conditional sampling with Predictor-Corrector (PC) samplers.

  The score of p_t(x | y) is the model's score plus grad_x log p_t(y | x), the latter from a noise-dependent
  classifier. Score SDE's version (JAX) takes a flax classifier and its parameters
  (`score_model, classifier, classifier_params`) and returns a pmapped `sampler(rng, state, labels)`. Here
  `classifier` is a PyTorch callable `classifier(x, noise_scale) -> logits` of shape (B, num_classes), with
  `noise_scale` the std of the perturbation kernel at t, shape (B,) (Score SDE's `ve_noise_scale`), and the
  sampler takes the score model at call time, as the other PyTorch samplers do.

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    classifier: A PyTorch callable (x, noise_scale) -> logits, the noise-dependent classifier.
    shape: A sequence of integers. The expected shape of a batch of samples, (B, ...).
    predictor: A subclass of `sampling.Predictor` that represents a predictor algorithm.
    corrector: A subclass of `sampling.Corrector` that represents a corrector algorithm.
    inverse_scaler: The inverse data normalizer.
    snr: A `float` number. The signal-to-noise ratio for correctors.
    n_steps: An integer. The number of corrector steps per update of the predictor.
    probability_flow: If `True`, solve the probability flow ODE for sampling with the predictor.
    continuous: `True` indicates the score-based model was trained with continuous time.
    denoise: If `True`, add one-step denoising to final samples.
    eps: A `float` number. The SDE/ODE will be integrated to `eps` to avoid numerical issues.
    device: PyTorch device.

  Returns:
    A class-conditional sampler `pc_conditional_sampler(model, labels)` returning samples.
  """
  sde_lib.check_eps(sde, eps)
  classifier_grad_fn = get_classifier_grad_fn(classifier)

  def get_total_grad_fn(model, labels):
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)

    def total_grad_fn(x, t):
      ve_noise_scale = sde.marginal_prob(x, t)[1]
      return score_fn(x, t) + classifier_grad_fn(x, ve_noise_scale, labels)

    return total_grad_fn

  def conditional_predictor_update_fn(model, x, t, labels):
    """The predictor update function for class-conditional sampling."""
    total_grad_fn = get_total_grad_fn(model, labels)
    if predictor is None:
      predictor_obj = NonePredictor(sde, total_grad_fn, probability_flow)
    else:
      predictor_obj = predictor(sde, total_grad_fn, probability_flow)
    return predictor_obj.update_fn(x, t)

  def conditional_corrector_update_fn(model, x, t, labels):
    """The corrector update function for class-conditional sampling."""
    total_grad_fn = get_total_grad_fn(model, labels)
    if corrector is None:
      corrector_obj = NoneCorrector(sde, total_grad_fn, snr, n_steps)
    else:
      corrector_obj = corrector(sde, total_grad_fn, snr, n_steps)
    return corrector_obj.update_fn(x, t)

  def pc_conditional_sampler(model, labels):
    """Generate class-conditional samples with Predictor-Corrector (PC) samplers.

    Args:
      model: A score model.
      labels: A tensor of integers, shape (B,): the target class of each sample.

    Returns:
      Class-conditional samples.
    """
    if tuple(labels.shape) != (shape[0],):
      raise ValueError(f'labels have shape {tuple(labels.shape)}; expected ({shape[0]},), one class per sample.')
    with torch.no_grad():
      labels = labels.to(device)
      x = sde.prior_sampling(shape).to(device)
      x_mean = x
      timesteps = torch.linspace(sde.T, eps, sde.N, device=device)
      for i in range(sde.N):
        vec_t = torch.ones(shape[0], device=device) * timesteps[i]
        x, x_mean = conditional_corrector_update_fn(model, x, vec_t, labels)
        x, x_mean = conditional_predictor_update_fn(model, x, vec_t, labels)
      return inverse_scaler(x_mean if denoise else x)

  return pc_conditional_sampler
