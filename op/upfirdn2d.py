"""upfirdn2d: upsample, FIR-filter and downsample a batch of images (StyleGAN2's op), in pure PyTorch.

For each channel of x (N, C, H, W), `upfirdn2d` computes, as StyleGAN2's CUDA kernel:
  1. upsampling by zero insertion: `up - 1` zeros after every pixel, in each spatial dimension;
  2. padding by `pad = (p0, p1)` zeros before/after in both spatial dimensions (negative values crop);
  3. a true 2-D convolution ("valid" mode) with the FIR `kernel` (kh, kw);
  4. downsampling by keeping every `down`-th sample, starting with the first.

Score SDE's native fallback reshapes to (N * C, 1, H, W), pads and runs a single-channel conv2d, with
permutes (copies) around it. Here the whole batch is filtered at once with a depthwise (grouped) conv:
`conv2d(groups=C, stride=down)` when `up == 1`, and `conv_transpose2d(groups=C, stride=up)` when `up > 1`
(a transposed conv with stride `up` *is* zero insertion followed by a full convolution, so the zeros are
never materialized). Everything is built from differentiable PyTorch ops, so gradients of any order are
exact; the score-FPE regularizer differentiates through this op three times.
"""

import torch
import torch.nn.functional as F


def _as_pair(pad):
  if isinstance(pad, int):
    return pad, pad
  pad = tuple(int(p) for p in pad)
  if len(pad) != 2:
    raise ValueError(f'upfirdn2d: pad must be an int or a pair (p0, p1), got {pad!r}.')
  return pad


def _depthwise_weight(kernel, channels, dtype, device, flip):
  k = torch.as_tensor(kernel, dtype=dtype, device=device)
  if k.dim() != 2:
    raise ValueError(f'upfirdn2d: kernel must be 2-D (kh, kw), got shape {tuple(k.shape)}.')
  if flip:
    k = torch.flip(k, [0, 1])
  return k[None, None].expand(channels, 1, *k.shape)


def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):  # pylint: disable=redefined-builtin
  """Upsamples, FIR-filters and downsamples a batch of 2-D images (StyleGAN2's `upfirdn2d`).

  Args:
    input: tensor of shape (N, C, H, W).
    kernel: FIR filter of shape (kh, kw) (tensor or array); cast to the dtype and device of `input`.
    up: integer upsampling factor (>= 1), in both spatial dimensions.
    down: integer downsampling factor (>= 1), in both spatial dimensions.
    pad: `(p0, p1)` (or an int): zeros added before/after, in both spatial dimensions, after upsampling.
      Negative values crop.

  Returns:
    Tensor of shape (N, C, (H * up + p0 + p1 - kh) // down + 1, (W * up + p0 + p1 - kw) // down + 1).
  """
  if input.dim() != 4:
    raise ValueError(f'upfirdn2d: input must have shape (N, C, H, W), got {tuple(input.shape)}.')
  up, down = int(up), int(down)
  if up < 1 or down < 1:
    raise ValueError(f'upfirdn2d: up and down must be >= 1, got up={up}, down={down}.')
  p0, p1 = _as_pair(pad)
  channels, in_h, in_w = input.shape[1:]
  kh, kw = torch.as_tensor(kernel).shape[-2:]
  out_h = in_h * up + p0 + p1 - kh + 1
  out_w = in_w * up + p0 + p1 - kw + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f'upfirdn2d: empty output for input {tuple(input.shape)}, kernel {(kh, kw)}, up={up}, '
                     f'pad={(p0, p1)}.')

  if up == 1:
    # conv2d is a cross-correlation: flip the kernel to get upfirdn2d's true convolution.
    weight = _depthwise_weight(kernel, channels, input.dtype, input.device, flip=True)
    if p0 == p1 and p0 >= 0:
      return F.conv2d(input, weight, stride=down, padding=p0, groups=channels)
    x = F.pad(input, (p0, p1, p0, p1))  # negative pads crop
    return F.conv2d(x, weight, stride=down, groups=channels)

  # Transposed conv with stride `up`: full[n] = sum_i x[i] k[n - i * up], i.e. the full true convolution of
  # the zero-inserted signal (without its trailing zeros). upfirdn2d's output m is full[m + kh - 1 - p0].
  weight = _depthwise_weight(kernel, channels, input.dtype, input.device, flip=False)
  crop_h0, crop_w0 = kh - 1 - p0, kw - 1 - p0
  # Last full index is (H - 1) * up + kh - 1; the last needed one is H * up + p1 - 1.
  crop_h1 = (in_h - 1) * up + kh - 1 - (in_h * up + p1 - 1)
  crop_w1 = (in_w - 1) * up + kw - 1 - (in_w * up + p1 - 1)
  if crop_h0 == crop_h1 == crop_w0 == crop_w1 and crop_h0 >= 0:
    x = F.conv_transpose2d(input, weight, stride=up, padding=crop_h0, groups=channels)
  else:
    x = F.conv_transpose2d(input, weight, stride=up, groups=channels)
    x = F.pad(x, (-crop_w0, -crop_w1, -crop_h0, -crop_h1))  # negative crops pad with zeros
  if down > 1:
    x = x[:, :, ::down, ::down]
  return x


def upfirdn2d_per_channel(input, kernel, up=1, down=1, pad=(0, 0)):  # pylint: disable=redefined-builtin
  """The per-channel formulation of Score SDE's native fallback (reference for tests and benchmarks).

  Every channel becomes a separate single-channel image: zero insertion and padding by reshapes and
  `F.pad`, then one single-channel `conv2d` over N * C images. Same arguments and result as `upfirdn2d`.
  """
  p0, p1 = _as_pair(pad)
  n, c, in_h, in_w = input.shape
  k = torch.as_tensor(kernel, dtype=input.dtype, device=input.device)
  kh, kw = k.shape
  x = input.reshape(n * c, in_h, 1, in_w, 1)
  x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
  x = x.reshape(n * c, 1, in_h * up, in_w * up)
  x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
  x = x[:, :, max(-p0, 0):x.shape[2] - max(-p1, 0), max(-p0, 0):x.shape[3] - max(-p1, 0)]
  x = F.conv2d(x, torch.flip(k, [0, 1])[None, None])
  x = x[:, :, ::down, ::down]
  return x.reshape(n, c, x.shape[2], x.shape[3])
