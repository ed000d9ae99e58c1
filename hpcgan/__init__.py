"""hpcgan: preemption-safe, distributed GAN training for synthetic 2D brain MRI slices."""

__all__ = ["load_generator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`hpcgan.load_generator` without importing torch for `import hpcgan` (the CLI's first moments)."""
    if name == "load_generator":
        from hpcgan.train.generator import load_generator

        return load_generator
    raise AttributeError(f"module 'hpcgan' has no attribute {name!r}")
