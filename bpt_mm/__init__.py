"""bpt_mm: Burstiness-aware Prompt Tuning (BPT) for mmdet and mmseg.

Importing the package checks the versions of the stack, registers its
models, prompts and hooks (see :mod:`bpt_mm.registry`) and adapts how
mmengine reads and writes checkpoints (see :mod:`bpt_mm.mmengine_patches`,
which says how to opt out).
"""
from .compat import check_environment
from .package_files import config_path
from .version import __version__

check_environment()

from . import engine, models  # noqa: E402,F401  (registers classes)
from .mmengine_patches import install_mmengine_patches  # noqa: E402
from .utils import trainable_parameters  # noqa: E402,F401

# What importing bpt_mm changes in mmengine (checkpoint reading and
# writing), and its opt-out: bpt_mm.mmengine_patches. It is installed here,
# after the parts it takes its replacements from, so that the edge goes one
# way: the adaptations import engine and models, never the reverse.
install_mmengine_patches()

__all__ = ['__version__', 'config_path', 'models', 'trainable_parameters']
