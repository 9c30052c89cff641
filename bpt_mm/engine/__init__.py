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
from ..models.checkpoint_source import install_remote_loaders

# mmengine reads local checkpoints (--resume, load_from, test) through this,
# with torch's weights-only loader alone ...
install_checkpoint_loader()
# ... which reads them because the Runner writes them as plain data.
install_plain_checkpoint_saver()
# URLs and model-zoo names: downloaded, then read by that same local loader.
install_remote_loaders(load_local_checkpoint)
# ... and writes local files (checkpoints) atomically: temporary file, rename.
install_atomic_local_backend()

__all__ = ['TrainableParametersHook', 'BPTWhiteningHook', 'RandomStateHook',
           'TrainableCheckpointHook', 'FiniteCheckHook',
           'LayerDecayOptimWrapperConstructor',
           'PromptStatsHook', 'load_local_checkpoint',
           'install_checkpoint_loader', 'install_plain_checkpoint_saver',
           'install_atomic_local_backend']
