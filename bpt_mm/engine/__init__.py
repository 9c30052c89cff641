from .checkpoint_io import (install_atomic_local_backend,
                            install_checkpoint_loader,
                            install_plain_checkpoint_saver,
                            load_local_checkpoint)
from .checkpoint_hooks import RandomStateHook, TrainableCheckpointHook
from .finite_check_hook import FiniteCheckHook
from .hooks import TrainableParametersHook
from .optim import LayerDecayOptimWrapperConstructor
from .prompt_stats_hook import PromptStatsHook
from .whitening_hook import BPTWhiteningHook

# The install_* functions are the replacements of mmengine's checkpoint
# reading and writing; bpt_mm/__init__.py installs them through
# bpt_mm.mmengine_patches (the one place that changes mmengine, and its
# opt-out), which this package never imports.

__all__ = ['TrainableParametersHook', 'BPTWhiteningHook', 'RandomStateHook',
           'TrainableCheckpointHook', 'FiniteCheckHook',
           'LayerDecayOptimWrapperConstructor',
           'PromptStatsHook', 'load_local_checkpoint',
           'install_checkpoint_loader', 'install_plain_checkpoint_saver',
           'install_atomic_local_backend']
