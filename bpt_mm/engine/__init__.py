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
from ..mmengine_patches import install_mmengine_patches

# How mmengine reads and writes checkpoints (weights-only loading, the plain
# save form, remote names read like local files, atomic writes): the one
# place that changes mmengine, and its opt-out, is bpt_mm.mmengine_patches.
install_mmengine_patches()

__all__ = ['TrainableParametersHook', 'BPTWhiteningHook', 'RandomStateHook',
           'TrainableCheckpointHook', 'FiniteCheckHook',
           'LayerDecayOptimWrapperConstructor',
           'PromptStatsHook', 'load_local_checkpoint',
           'install_checkpoint_loader', 'install_plain_checkpoint_saver',
           'install_atomic_local_backend']
