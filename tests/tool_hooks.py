"""Hooks that only the end-to-end tests use (imported through
``custom_imports`` in the configs the tests write; tests/ is put on
PYTHONPATH)."""
import os
import os.path as osp
import time

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpTrainableHook(Hook):
    """Write this rank's trainable parameters to ``out_dir/rank{r}.pth``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def after_train(self, runner) -> None:
        model = getattr(runner.model, 'module', runner.model)
        state = {k: v.detach().cpu().clone()
                 for k, v in model.named_parameters() if v.requires_grad}
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(state, osp.join(self.out_dir, f'rank{get_rank()}.pth'))


@HOOKS.register_module()
class StallHook(Hook):
    """Stop making progress before iteration ``at_iter`` (1-based), as a
    job that is still running when it is killed: the test sends SIGKILL at
    some point before, so the run never reaches its end on its own."""

    priority = 'LOWEST'

    def __init__(self, at_iter: int, seconds: float = 600) -> None:
        self.at_iter = at_iter
        self.seconds = seconds

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter + 1 == self.at_iter:
            time.sleep(self.seconds)


@HOOKS.register_module()
class PoisonWhiteningHook(Hook):
    """Make rank ``rank`` fail while BPTWhiteningHook (which runs after this
    hook in ``before_train``) reads its images: ``mode='nan'`` makes them
    non-finite, as a corrupt shard or an fp16 overflow on one machine
    would; ``mode='exit'`` ends the process abruptly (``os._exit(7)``), as
    the kernel's OOM killer would. Other ranks are untouched."""

    priority = 'HIGH'

    def __init__(self, rank: int, mode: str = 'nan') -> None:
        assert mode in ('nan', 'exit'), mode
        self.rank = rank
        self.mode = mode

    def before_train(self, runner) -> None:
        if get_rank() != self.rank:
            return
        model = getattr(runner.model, 'module', runner.model)

        def poison(module, args):
            if self.mode == 'exit':
                os._exit(7)
            return (torch.full_like(args[0], float('nan')), )

        model.backbone.patch_embed.register_forward_pre_hook(poison)
