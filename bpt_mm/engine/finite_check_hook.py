"""``FiniteCheckHook``: stop a run at its first non-finite loss or weight.

mmengine trains on through a NaN/Inf loss (the optimizer step turns the
weights into NaN), saves checkpoints of them and, with ``max_keep_ckpts``,
rotates away the last finite one, and the run ends with exit code 0. This
hook raises ``FloatingPointError`` instead (as detectron2 does), before any
checkpoint of that iteration is written.

Mixed precision: ``AmpOptimWrapper``'s GradScaler skips steps whose
gradients overflow in fp16 and lowers its scale; that is normal and not
refused here. Only a non-finite loss, or weights that became non-finite,
stop the run.
"""
import math
from typing import Any, Dict, Optional

import torch
from mmengine.dist import all_reduce
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner import IterBasedTrainLoop

from bpt_mm.finite import non_finite_tensors
from bpt_mm.models.vit import unwrap_model
from bpt_mm.registry import register_hook

#: Names under which the hook can appear in ``custom_hooks``.
FINITE_CHECK_HOOK_TYPES = ('FiniteCheckHook', 'bpt_mm.FiniteCheckHook')


def non_finite_loss_terms(log_vars: Any) -> Dict[str, float]:
    """The loss terms of a ``train_step`` output that are not finite.

    ``train_step`` returns the log variables of ``BaseModel.parse_losses``:
    the total ``loss`` first, then each term; the terms whose name contains
    ``'loss'`` are the ones summed into the total (accuracies and the like
    are not losses and are not checked).

    Args:
        log_vars: The ``outputs`` of ``after_train_iter`` (a dict of names
            to tensors or numbers); anything else gives ``{}``.

    Returns:
        dict: ``{name: value}`` of every non-finite loss term.
    """
    if not isinstance(log_vars, dict):
        return {}
    tensors: Dict[str, torch.Tensor] = {}
    bad: Dict[str, float] = {}
    for name, value in log_vars.items():
        if 'loss' not in name:
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, (int, float)) \
                and not math.isfinite(float(value)):
            bad[name] = float(value)
    # Every iteration: one device synchronisation for all the terms; the
    # values are read only for the terms that are not finite.
    for name in non_finite_tensors(tensors, limit=len(tensors)):
        value = tensors[name].detach().float()
        bad[name] = value.mean().item()
    return {name: bad[name] for name in log_vars if name in bad}


@register_hook()
class FiniteCheckHook(Hook):
    """Stop training at the first non-finite loss or weight.

    After every training iteration the loss terms of ``train_step``'s log
    variables are checked, and the trainable weights; before every
    checkpoint save the checkpoint's ``state_dict`` is checked. A
    non-finite value raises ``FloatingPointError`` naming the iteration and
    the loss terms (or tensors), so the run exits non-zero and no
    checkpoint of non-finite weights is written or rotates a finite one
    away: the iteration check runs just before ``CheckpointHook`` (which
    removes the oldest checkpoint before saving the new one), and the save
    check inside ``save_checkpoint`` before the file is written (a backstop
    for saves outside the iteration). Under DDP the decision is the same on
    every rank (a max over ranks), so no rank is left waiting in a
    collective.

    It is in every config of ``configs/``, and ``tools/train.py`` adds it to
    a config that lacks it; ``--allow-non-finite`` is the explicit way off.

    Args:
        check_weights (bool): Also check the trainable weights after each
            iteration (one reduction per trainable tensor). Defaults to
            True: a non-finite gradient without a non-finite loss shows up
            there.
    """

    # Just before CheckpointHook (VERY_LOW = 90), which removes the oldest
    # checkpoint (max_keep_ckpts) before it saves: every other hook of the
    # iteration has run (the logger has written the non-finite loss), and
    # nothing is removed or saved yet.
    priority = 89

    def __init__(self, check_weights: bool = True) -> None:
        if not isinstance(check_weights, bool):
            raise TypeError('FiniteCheckHook `check_weights` must be a bool, '
                            f'got {check_weights!r}')
        self.check_weights = check_weights

    @staticmethod
    def _trainable(runner) -> Dict[str, torch.Tensor]:
        model = unwrap_model(runner.model)
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def before_train(self, runner) -> None:
        # A resumed or loaded checkpoint may already hold NaN (one saved
        # without this hook).
        bad = non_finite_tensors(self._trainable(runner))
        if bad:
            raise FloatingPointError(
                f'FiniteCheckHook: before training, trainable weights hold '
                f'NaN/Inf: {bad}; the loaded checkpoint '
                f'({getattr(runner, "_load_from", None)!r}) or the '
                'initialisation is broken')

    @staticmethod
    def _iteration_save_due(runner) -> bool:
        """Whether a ``CheckpointHook`` saves after this iteration, by the
        hook's own rule (``interval``, ``save_begin``, ``save_last``).

        mmengine's CheckpointHook removes the oldest checkpoint
        (``max_keep_ckpts``) *before* it saves the new one; a save refused
        in ``before_save_checkpoint`` would then have rotated the last
        finite checkpoint away. So even with ``check_weights=False`` the
        weights are checked here, just before such a save.
        """
        for hook in getattr(runner, 'hooks', ()):
            if not isinstance(hook, CheckpointHook) or hook.by_epoch:
                continue
            if hook.every_n_train_iters(
                    runner, hook.interval,
                    getattr(hook, 'save_begin', 0)) or (
                        hook.save_last and hook.is_last_train_iter(runner)):
                return True
        return False

    def after_train_epoch(self, runner) -> None:
        # Just before an epoch-based CheckpointHook's save (and rotation):
        # with check_weights=False nothing has looked at the weights yet.
        if not self.check_weights:
            self._stop_if_non_finite(runner, {}, True, epoch_end=True)

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Any = None,
                         outputs: Optional[Dict[str, Any]] = None) -> None:
        self._stop_if_non_finite(
            runner, non_finite_loss_terms(outputs),
            self.check_weights or self._iteration_save_due(runner))

    def _stop_if_non_finite(self, runner, losses: Dict[str, float],
                            check_weights: bool,
                            epoch_end: bool = False) -> None:
        """Raise ``FloatingPointError`` when ``losses`` holds terms or (if
        ``check_weights``) the trainable weights hold NaN/Inf on any rank.
        ``epoch_end``: called after the epoch's last iteration, when the
        loop has already counted it.
        """
        weights = non_finite_tensors(self._trainable(runner)) \
            if check_weights else []
        flags = torch.tensor([int(bool(losses)), int(bool(weights))],
                             dtype=torch.int64)
        all_reduce(flags, op='max')  # no-op in a single process
        if not flags.any():
            return
        # As the logger counts: inside an iteration runner.iter is the
        # number of finished ones; at an epoch's end it includes it.
        where = f'iteration {runner.iter + (0 if epoch_end else 1)}'
        if epoch_end:
            where = f'the end of epoch {runner.epoch + 1} ({where})'
        elif not isinstance(runner.train_loop, IterBasedTrainLoop):
            where += f' (epoch {runner.epoch + 1})'
        if losses:
            terms = ', '.join(f'{k}={v}' for k, v in losses.items())
            what = f'non-finite loss terms: {terms}'
        elif weights:
            what = (f'the loss is finite but the optimizer step made the '
                    f'trainable weights non-finite (non-finite gradients): '
                    f'{weights}')
        else:
            what = 'another process saw a non-finite loss or weight'
        raise FloatingPointError(
            f'FiniteCheckHook: training stopped at {where}: {what}. No '
            'checkpoint of this '
            'iteration is saved. Lower the learning rate, check the data '
            '(e.g. boxes and image sizes) or add gradient clipping '
            '(`optim_wrapper.clip_grad`)')

    def before_save_checkpoint(self, runner, checkpoint: Dict[str, Any]
                               ) -> None:
        state = checkpoint.get('state_dict') or {}
        bad = non_finite_tensors(state)
        if bad:
            raise FloatingPointError(
                f'FiniteCheckHook: refusing to save a checkpoint at '
                f'iteration {runner.iter} whose weights hold NaN/Inf: {bad}; '
                'nothing is written (a CheckpointHook with max_keep_ckpts '
                'may have removed its oldest checkpoint before this save; '
                'the per-iteration check is meant to stop the run first)')
