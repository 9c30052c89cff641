"""Hooks that decide what a checkpoint holds and how it is restored.

- :class:`TrainableCheckpointHook`: checkpoints without the frozen backbone,
  and a guard that restores it whenever a checkpoint lacks it (test included,
  where ``init_weights`` never runs).
- :class:`RandomStateHook`: random-number-generator states in every
  checkpoint, so that ``--resume`` continues the very same run.

Both are thin: the work is in :mod:`bpt_mm.engine.trainable_state` and below.
"""
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.runner import IterBasedTrainLoop

from bpt_mm.registry import register_hook
from bpt_mm.engine.trainable_state import (backbone_fingerprint,
                                           check_can_strip,
                                           restore_frozen_backbone,
                                           strip_frozen_backbone)

#: Names under which the hooks can appear in ``custom_hooks``.
TRAINABLE_CHECKPOINT_HOOK_TYPES = ('TrainableCheckpointHook',
                                   'bpt_mm.TrainableCheckpointHook')


@register_hook()
class TrainableCheckpointHook(Hook):
    """Save prompts, whitening, neck and heads only; restore the frozen
    backbone from its pretrained file whenever a checkpoint lacks it.

    On save (``before_save_checkpoint``), the frozen backbone tensors are
    removed from the checkpoint and ``meta['bpt_mm']`` records the
    pretrained file and a SHA-256 of the frozen weights. On load
    (``after_load_checkpoint``: ``--resume``, ``load_from`` and testing), a
    checkpoint that lacks backbone weights is completed from the backbone's
    ``init_cfg`` checkpoint, after checking the fingerprint; without a
    pretrained file it is refused. ``tools/test.py`` adds this hook with
    ``save_trainable_only=False`` to every config that lacks it, so a
    trainable-only checkpoint can never be evaluated on a random backbone.

    Args:
        save_trainable_only (bool): Strip the frozen backbone when saving.
            False keeps full checkpoints and only guards loading.

    Examples:
        >>> custom_hooks = [dict(type='TrainableCheckpointHook')]
    """

    priority = 'VERY_HIGH'  # complete a checkpoint before others read it

    def __init__(self, save_trainable_only: bool = True) -> None:
        if not isinstance(save_trainable_only, bool):
            raise TypeError(f'`save_trainable_only` must be a bool, got '
                            f'{save_trainable_only!r}')
        self.save_trainable_only = save_trainable_only
        self._fingerprint: Optional[str] = None
        self._sizes_logged = False

    def before_train(self, runner) -> None:
        if self.save_trainable_only:
            # Refuse now, not at the first save hours later (testing with
            # the same config saves nothing and needs no check).
            check_can_strip(runner.model)

    def before_save_checkpoint(self, runner, checkpoint: Dict[str, Any]
                               ) -> None:
        if not self.save_trainable_only:
            return
        if self._fingerprint is None:
            # Frozen weights never change: hash them once.
            self._fingerprint = backbone_fingerprint(
                check_can_strip(runner.model))
        info = strip_frozen_backbone(runner.model, checkpoint,
                                     self._fingerprint)
        if not self._sizes_logged:
            runner.logger.info(
                f"TrainableCheckpointHook: checkpoint weights "
                f"{info['bytes_after'] / 2**20:.2f} MiB instead of "
                f"{info['bytes_before'] / 2**20:.2f} MiB ({info['removed']} "
                f'frozen backbone tensors left out; they are restored from '
                f'the pretrained file on load)')
            self._sizes_logged = True

    def after_load_checkpoint(self, runner, checkpoint: Dict[str, Any]
                              ) -> None:
        # runner._load_from is the file of --resume PATH, load_from and
        # tools/test.py's checkpoint: named in refusals.
        restore_frozen_backbone(runner.model, checkpoint, runner.logger,
                                source=getattr(runner, '_load_from', None))


def _rng_states() -> Dict[str, Any]:
    states = dict(python=random.getstate(), numpy=np.random.get_state(),
                  torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states['python'])
    np.random.set_state(states['numpy'])
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def _skip_batches_without_loading(loop, count: int) -> bool:
    """Advance an IterBasedTrainLoop's single-process data iterator by
    ``count`` batches of indices without loading them (no pipeline, so no
    random numbers drawn). Returns False where that is not possible."""
    outer = getattr(loop, 'dataloader_iterator', None)
    inner = getattr(outer, '_iterator', None)
    if inner is None or not hasattr(inner, '_next_index') or \
            getattr(inner, '_num_workers', 1) != 0:
        return False
    loader = outer._dataloader
    for _ in range(count):
        try:
            inner._next_index()
        except StopIteration:
            # The same epoch change as mmengine's infinite iterator makes.
            outer._epoch += 1
            sampler = getattr(loader, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(outer._epoch)
            inner = outer._iterator = iter(loader)
            inner._next_index()
    return True


class _SwallowNext:
    """Iterator proxy whose first ``count`` ``next`` calls return None: the
    IterBasedTrainLoop's own skip of already-trained batches, made free
    after :func:`_skip_batches_without_loading` did it."""

    def __init__(self, iterator, count: int) -> None:
        self.iterator = iterator
        self.count = count

    def __iter__(self):
        return self

    def __next__(self):
        if self.count > 0:
            self.count -= 1
            return None
        return next(self.iterator)


@register_hook()
class RandomStateHook(Hook):
    """Make a resumed run continue exactly where the interrupted one was.

    mmengine saves the model, optimizer, schedulers and counters, but not
    the random-number generators, and on resume an IterBasedTrainLoop
    re-runs the data pipeline over every batch it skips, drawing random
    numbers the original run drew for training. So a resumed run sees other
    augmentations and samples other proposals than an uninterrupted one.
    This hook:

    - stores the Python, numpy, torch (and CUDA) generator states in every
      checkpoint (``checkpoint['random_state']``);
    - on resume, skips the trained batches by their indices only (for a
      single-process data loader; worker processes have generators of
      their own that the ordinary skip reproduces) and then restores the
      saved states, just before the first new batch is loaded;
    - keeps validation during training from consuming the training
      generators (their state is put back after each validation), so the
      saved state is the one the next batch starts from.

    With ``randomness=dict(seed=..., deterministic=True)``, a run resumed
    from iteration k ends with the same weights as an uninterrupted run.

    Examples:
        >>> custom_hooks = [dict(type='RandomStateHook')]
    """

    # Last in before_train_epoch, so no other hook draws after the restore.
    priority = 'LOWEST'

    def __init__(self) -> None:
        self._resumed: Optional[Dict[str, Any]] = None
        self._val_snapshot: Optional[Dict[str, Any]] = None

    def before_save_checkpoint(self, runner, checkpoint: Dict[str, Any]
                               ) -> None:
        # Inside a validation (save_best) the training stream is the
        # snapshot, not what validation has drawn since.
        checkpoint['random_state'] = self._val_snapshot or _rng_states()

    def after_load_checkpoint(self, runner, checkpoint: Dict[str, Any]
                              ) -> None:
        if runner._resume:  # load_from alone starts a new run
            self._resumed = checkpoint.get('random_state')
            if self._resumed is None:
                runner.logger.warning(
                    'RandomStateHook: the resumed checkpoint holds no random '
                    'state (it was saved without this hook); the run goes on '
                    'with fresh generator states')

    def before_train_epoch(self, runner) -> None:
        if self._resumed is None:
            return
        loop = runner.train_loop
        # An epoch-based loop restarts its data loader at the epoch, which
        # needs no skipping; an iteration-based one skips `iter` batches.
        done = loop.iter if isinstance(loop, IterBasedTrainLoop) else 0
        if done > 0 and _skip_batches_without_loading(loop, done):
            loop.dataloader_iterator = _SwallowNext(loop.dataloader_iterator,
                                                    done)
        _set_rng_states(self._resumed)
        runner.logger.info('RandomStateHook: random generator states '
                           f'restored (iteration {runner.iter})')
        self._resumed = None

    def before_val(self, runner) -> None:
        self._val_snapshot = _rng_states()

    def after_val(self, runner) -> None:
        if self._val_snapshot is not None:
            _set_rng_states(self._val_snapshot)
            self._val_snapshot = None
