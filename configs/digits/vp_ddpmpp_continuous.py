"""Small DDPM++ on DIGITS, VP SDE, continuous time: Score SDE's `vp/cifar10_ddpmpp_continuous.py` scaled down
(data in [-1, 1], Euler-Maruyama predictor)."""

from configs.digits.default_digits_configs import digits
from configs.vp.cifar10_ddpmpp_continuous import get_config as get_cifar10_config


def get_config():
  return digits(get_cifar10_config())
