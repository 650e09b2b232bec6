"""StyleGAN2's custom ops, in pure PyTorch (differentiable to any order; see docs/performance.md)."""

from .fused_act import FusedLeakyReLU, fused_bias_act, fused_leaky_relu
from .upfirdn2d import upfirdn2d
