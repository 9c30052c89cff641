"""What importing bpt_mm changes in mmengine, in one place.

mmengine 0.10 offers no extension point for how checkpoints are read and
written, so bpt_mm replaces four of its globals when ``bpt_mm`` is imported
(``import bpt_mm``, ``custom_imports=['bpt_mm']``, or the import of any of
its modules, which imports the package first):

* ``CheckpointLoader``'s loader for local paths: every ``--resume``,
  ``load_from`` and ``tools/test.py`` checkpoint is read by torch's
  weights-only loader alone, with size limits
  (:func:`bpt_mm.engine.checkpoint_io.load_local_checkpoint`);
* its loaders for URLs and model-zoo names (``https://``, ``open-mmlab://``,
  ``torchvision://``, ``mmcls://``...): downloaded into torch hub's cache,
  then read by that same local loader instead of mmengine's full unpickling;
  and for every other ``prefix://``: a prefix served by an
  ``mmengine.fileio`` backend (``s3://``, ``petrel://``, a registered one)
  is read by that backend into a temporary file and then by the same
  local loader, any other (``pavi://``) is refused naming it; a scheme a
  project registers itself with ``CheckpointLoader.register_scheme`` keeps
  its loader, whether registered before ``import bpt_mm`` or after
  (:func:`bpt_mm.models.checkpoint_source.install_remote_loaders`);
* ``save_checkpoint`` as the Runner calls it: the message hub's history
  buffers and numpy values are written as plain tensors and numbers, so the
  weights-only loader can read them back
  (:func:`bpt_mm.engine.checkpoint_io.save_plain_checkpoint`);
* the file backend of local paths: files are written to a temporary name
  and renamed, so a killed job never leaves half a checkpoint
  (:class:`bpt_mm.engine.checkpoint_io.AtomicLocalBackend`).

Setting the environment variable ``BPT_MM_PATCH_MMENGINE=0`` before the
import leaves mmengine exactly as it is. bpt_mm's models and hooks still
register and work; what is lost: mmengine's stock loader then refuses the
checkpoints a Runner writes on torch >= 2.6 (their message hub), remote
checkpoints are read by mmengine's loaders (``torch.load`` without bpt_mm's
limits), and saves are not atomic.
"""
import os
from typing import Dict

import mmengine.runner.runner as runner_module
from mmengine.fileio.backends.registry_utils import backends
from mmengine.runner.checkpoint import CheckpointLoader

# The replacements live with what they replace for (engine: checkpoint I/O;
# models: where pretrained weights come from). This module may import them;
# neither engine nor models imports this module (bpt_mm/__init__.py installs
# it), so the edge goes one way.
from .engine.checkpoint_io import (AtomicLocalBackend,
                                   install_atomic_local_backend,
                                   install_checkpoint_loader,
                                   install_plain_checkpoint_saver,
                                   load_local_checkpoint,
                                   save_plain_checkpoint)
from .models.checkpoint_source import (ANY_PREFIX_SCHEME,
                                        install_remote_loaders)

__all__ = ['OPT_OUT_VARIABLE', 'patching_enabled',
           'install_mmengine_patches', 'installed_patches']

#: The environment variable that, set to ``0``, keeps mmengine unpatched.
OPT_OUT_VARIABLE = 'BPT_MM_PATCH_MMENGINE'


def patching_enabled() -> bool:
    """False when ``BPT_MM_PATCH_MMENGINE`` is ``0`` (or ``false``/``no``).

    Raises:
        ValueError: Another value than 0/1, true/false, yes/no.
    """
    value = os.environ.get(OPT_OUT_VARIABLE, '1').strip().lower()
    if value in ('1', 'true', 'yes', ''):
        return True
    if value in ('0', 'false', 'no'):
        return False
    raise ValueError(f'{OPT_OUT_VARIABLE} must be 1 (patch mmengine, the '
                     f'default) or 0 (leave it as it is), got {value!r}')


def install_mmengine_patches() -> bool:
    """Install the four replacements of the module docstring, unless
    :func:`patching_enabled` says no. Idempotent.

    Returns:
        bool: Whether they are installed.
    """
    if not patching_enabled():
        return False
    install_checkpoint_loader()
    install_remote_loaders(load_local_checkpoint)
    install_plain_checkpoint_saver()
    install_atomic_local_backend()
    return True


def installed_patches() -> Dict[str, bool]:
    """Which of the replacements are in place now (for reports and tests).
    """
    schemes = CheckpointLoader._schemes
    local = schemes.get('')
    return {
        'local_loader': local is load_local_checkpoint,
        # no prefixed scheme (https://, s3://, pavi://...) is left to
        # mmengine's loaders (a project's own ones may be there too)
        'remote_loaders': all(
            getattr(loader, '__module__', '') !=
            'mmengine.runner.checkpoint'
            for prefix, loader in schemes.items() if prefix) and getattr(
                schemes.get(ANY_PREFIX_SCHEME), '__module__', '') ==
        'bpt_mm.models.checkpoint_source',
        'plain_saver': runner_module.save_checkpoint is save_plain_checkpoint,
        'atomic_local_backend': backends.get('local') is AtomicLocalBackend,
    }
