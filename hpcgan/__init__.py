"""hpcgan: preemption-safe, distributed GAN training for synthetic 2D brain MRI slices."""

from hpcgan.train.generator import load_generator

__all__ = ["load_generator"]
__version__ = "0.1.0"
