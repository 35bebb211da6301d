"""mpoxscope: tell Mpox apart from look-alike skin diseases with an Attention-Guided Fusion Network (AGFN).

The package is a pipeline: ``data`` -> ``models`` -> ``engine`` (train, evaluate, predict) -> ``explain`` ->
``serve``; ``cli`` is a thin layer over it.
"""

from mpoxscope.errors import MpoxscopeError

__version__ = "0.1.0"
__all__ = ["MpoxscopeError", "__version__"]
