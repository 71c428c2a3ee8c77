"""xnorcdl: conditionally deep hybrid neural networks across edge and cloud.

The edge runs a stem and M quantized (1, 2 or 4-bit) convolutions with early exits; samples whose
exit entropy is below its threshold stop there, the others continue through float32 cloud layers
(Long, Chakraborty, Roy, "Conditionally Deep Hybrid Neural Networks Across Edge and Cloud").

The Python API (:mod:`xnorcdl.api`), loaded on first use so that ``import xnorcdl`` stays light::

    net = xnorcdl.load("weights/r32_20E.npz")
    images, labels = xnorcdl.load_cifar10("test")
    res = net.run(images[:1000], backend="fast", thresholds=None)

``res.predictions``, ``res.exits`` (exit index, ``xnorcdl.CLOUD`` = -1 for the head),
``res.entropies`` and ``res.energy``. The command line: ``python -m xnorcdl --help``.
"""
__version__ = "0.1.0"

#: public name -> (module, attribute), imported on first access
_LAZY = {
    "load": ("xnorcdl.api", "load"),
    "Network": ("xnorcdl.api", "Network"),
    "Result": ("xnorcdl.api", "Result"),
    "Energy": ("xnorcdl.api", "Energy"),
    "CLOUD": ("xnorcdl.api", "CLOUD"),
    "BACKENDS": ("xnorcdl.api", "BACKENDS"),
    "load_cifar10": ("xnorcdl.data", "load_cifar10"),
    "read_records": ("xnorcdl.records", "read_records"),
    "XnorcdlError": ("xnorcdl.errors", "XnorcdlError"),
    "WeightsError": ("xnorcdl.errors", "WeightsError"),
    "DataError": ("xnorcdl.errors", "DataError"),
    "EnergyTableError": ("xnorcdl.errors", "EnergyTableError"),
    "UsageError": ("xnorcdl.errors", "UsageError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xnorcdl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
