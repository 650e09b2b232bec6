"""DDPM model (Ho et al., 2020), the PyTorch equivalent of
https://github.com/hojonathanho/diffusion/blob/master/diffusion_tf/models/unet.py, as in Score SDE."""

import functools

import torch
import torch.nn as nn

from . import layers
from . import utils as mutils
from .ncsnpp import check_unet_config

RefineBlock = layers.RefineBlock
ResidualBlock = layers.ResidualBlock
ResnetBlockDDPM = layers.ResnetBlockDDPM
Upsample = layers.Upsample
Downsample = layers.Downsample
conv3x3 = layers.ddpm_conv3x3
get_act = layers.get_act
default_initializer = layers.default_init


@mutils.register_model(name='ddpm')
class DDPM(nn.Module):
  """The DDPM U-Net, conditioned on the (discrete or continuous) time step by sinusoidal embeddings."""

  def __init__(self, config):
    super().__init__()
    self.act = act = get_act(config)
    self.register_buffer('sigmas', torch.tensor(mutils.get_sigmas(config)))

    nf, ch_mult, num_res_blocks, attn_resolutions, dropout, all_resolutions = check_unet_config(config)
    self.nf = nf
    self.num_res_blocks = num_res_blocks
    self.attn_resolutions = attn_resolutions
    self.num_resolutions = num_resolutions = len(ch_mult)
    self.all_resolutions = all_resolutions
    resamp_with_conv = config.model.resamp_with_conv
    self._attn_at_level = [res in attn_resolutions for res in all_resolutions]

    AttnBlock = layers.AttnBlock
    self.conditional = conditional = config.model.conditional
    ResnetBlock = functools.partial(ResnetBlockDDPM, act=act, temb_dim=4 * nf, dropout=dropout)
    # Score SDE left `modules` undefined when unconditional (a crash); start from an empty list.
    modules = []
    if conditional:
      # Condition on noise levels.
      for dim_in in (nf, nf * 4):
        modules.append(layers.ddpm_linear(dim_in, nf * 4))

    self.centered = config.data.centered
    channels = config.data.num_channels

    # Downsampling block
    modules.append(conv3x3(channels, nf))
    hs_c = [nf]
    in_ch = nf
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        out_ch = nf * ch_mult[i_level]
        modules.append(ResnetBlock(in_ch=in_ch, out_ch=out_ch))
        in_ch = out_ch
        if self._attn_at_level[i_level]:
          modules.append(AttnBlock(channels=in_ch))
        hs_c.append(in_ch)
      if i_level != num_resolutions - 1:
        modules.append(Downsample(channels=in_ch, with_conv=resamp_with_conv))
        hs_c.append(in_ch)

    in_ch = hs_c[-1]
    modules.append(ResnetBlock(in_ch=in_ch))
    modules.append(AttnBlock(channels=in_ch))
    modules.append(ResnetBlock(in_ch=in_ch))

    # Upsampling block
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        out_ch = nf * ch_mult[i_level]
        modules.append(ResnetBlock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
        in_ch = out_ch
      if self._attn_at_level[i_level]:
        modules.append(AttnBlock(channels=in_ch))
      if i_level != 0:
        modules.append(Upsample(channels=in_ch, with_conv=resamp_with_conv))

    assert not hs_c  # the skip connections are consumed exactly
    modules.append(nn.GroupNorm(num_channels=in_ch, num_groups=32, eps=1e-6))
    modules.append(conv3x3(in_ch, channels, init_scale=0.))
    self.all_modules = nn.ModuleList(modules)

    self.scale_by_sigma = config.model.scale_by_sigma

  def forward(self, x, labels):
    """Network output for images x (B, C, H, W) at time labels `labels` (B,)."""
    modules = self.all_modules
    m_idx = 0
    if self.conditional:
      # timestep/scale embedding
      temb = layers.get_timestep_embedding(labels, self.nf)
      temb = modules[m_idx](temb)
      temb = modules[m_idx + 1](self.act(temb))
      m_idx += 2
    else:
      temb = None

    # Inputs in [0, 1] are mapped to [-1, 1].
    h = x if self.centered else 2 * x - 1.

    # Downsampling block
    hs = [modules[m_idx](h)]
    m_idx += 1
    for i_level in range(self.num_resolutions):
      for _ in range(self.num_res_blocks):
        h = modules[m_idx](hs[-1], temb)
        m_idx += 1
        if self._attn_at_level[i_level]:
          h = modules[m_idx](h)
          m_idx += 1
        hs.append(h)
      if i_level != self.num_resolutions - 1:
        hs.append(modules[m_idx](hs[-1]))
        m_idx += 1

    h = hs[-1]
    h = modules[m_idx](h, temb)
    h = modules[m_idx + 1](h)
    h = modules[m_idx + 2](h, temb)
    m_idx += 3

    # Upsampling block
    for i_level in reversed(range(self.num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = modules[m_idx](torch.cat([h, hs.pop()], dim=1), temb)
        m_idx += 1
      if self._attn_at_level[i_level]:
        h = modules[m_idx](h)
        m_idx += 1
      if i_level != 0:
        h = modules[m_idx](h)
        m_idx += 1

    h = self.act(modules[m_idx](h))
    h = modules[m_idx + 1](h)
    m_idx += 2
    assert m_idx == len(modules)  # every module used exactly once

    if self.scale_by_sigma:
      # Divide the output by sigmas. Useful for training with the NCSN loss. The DDPM loss scales the
      # network output by sigma in the loss function, so no need of doing it here.
      h = h / self.sigmas[labels.long(), None, None, None]
    return h
