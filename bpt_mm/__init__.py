"""bpt_mm: Burstiness-aware Prompt Tuning (BPT) for mmdet and mmseg.

Importing the package checks the versions of the stack and registers its
models, prompts and hooks (see :mod:`bpt_mm.registry`).
"""
from .compat import check_environment
from .package_files import config_path
from .version import __version__

check_environment()

from . import engine, models  # noqa: E402,F401  (registers classes)
from .utils import trainable_parameters  # noqa: E402,F401

__all__ = ['__version__', 'config_path', 'models', 'trainable_parameters']
