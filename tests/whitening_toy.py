"""A toy mmengine model, data set and Runner for the tests that train
without mmdet/mmseg.

The model and data set are registered in mmengine's root registries so
that a plain mmengine Runner or config can build them; this module is
imported by the tests and, through ``custom_imports`` or a script, by
their subprocesses (tests/ is put on PYTHONPATH).
"""
import time
import uuid
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from mmengine.runner import Runner
from torch.utils.data import Dataset

from bpt_mm.models import PromptedViT
from bpt_mm.whitening.collect import collect_whitening
from bpt_mm.whitening.options import WhiteningOptions
from helpers import IMG, small_vit


def toy_images(num: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(num, 3, IMG, IMG,
                      generator=torch.Generator().manual_seed(seed))


@MODELS.register_module(force=True)
class BPTWhiteningToyModel(BaseModel):
    """PromptedViT + a linear head on the mean feature of the last block."""

    def __init__(self, backbone: dict, num_classes: int = 3,
                 data_preprocessor=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor
                         or dict(type='ImgDataPreprocessor'))
        self.backbone = small_vit(**backbone)
        self.head = nn.Linear(self.backbone.embed_dims, num_classes)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        feat = self.backbone(inputs)[-1].mean((2, 3))
        logits = self.head(feat)
        if mode == 'loss':
            labels = torch.stack(list(data_samples)).to(logits.device)
            return {'loss': F.cross_entropy(logits, labels)}
        if mode == 'predict':
            return list(logits.argmax(1))
        return logits


@DATASETS.register_module(force=True)
class BPTWhiteningToyDataset(Dataset):
    """``num_images`` random images in [0, 1] with random labels."""

    def __init__(self, num_images: int = 16, seed: int = 0,
                 num_classes: int = 3) -> None:
        self.images = toy_images(num_images, seed)
        self.labels = torch.randint(
            num_classes, (num_images, ),
            generator=torch.Generator().manual_seed(seed + 1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return dict(inputs=self.images[index],
                    data_samples=self.labels[index])


def toy_runner(work_dir, prompt: Optional[dict] = None, hooks=(), *,
               model=None, dataset=None, num_images: int = 16,
               batch_size: int = 4,
               sampler: str = 'DefaultSampler', shuffle: bool = False,
               max_iters: int = 2, train_cfg: Optional[dict] = None,
               lr: float = 0.5, optim_wrapper: Optional[dict] = None,
               default_hooks: Optional[dict] = None,
               checkpoint_interval: Optional[int] = 1000,
               log_interval: Optional[int] = 1000,
               seed: Optional[int] = 0, model_seed: int = 0,
               **runner_kwargs) -> Runner:
    """A plain mmengine Runner (no mmdet/mmseg) training a toy model by
    iterations with SGD; the one set-up of the tests that need a Runner.

    Args:
        work_dir: the Runner's work_dir.
        prompt: the backbone's ``prompt`` option of the default model,
            BPTWhiteningToyModel (a copy is passed on).
        hooks: the custom hooks.
        model: another model (or model config) instead of the default.
        dataset: another train data set (config) instead of
            ``num_images`` of BPTWhiteningToyDataset.
        num_images: the size of the default data set.
        batch_size: images per step.
        sampler: the sampler type of the train loader.
        shuffle: whether the sampler shuffles.
        max_iters: iterations of the default train_cfg.
        train_cfg: another train_cfg instead of ``max_iters`` iterations.
        lr: the SGD learning rate of the default optim_wrapper.
        optim_wrapper: another optim_wrapper instead of SGD at ``lr``.
        default_hooks: the Runner's default_hooks, before the two below.
        checkpoint_interval: a by-iteration CheckpointHook with this
            interval, or None for ``default_hooks``/mmengine's.
        log_interval: a LoggerHook with this interval, or None for
            ``default_hooks``/mmengine's.
        seed: the Runner's random seed (None: mmengine draws one).
        model_seed: torch's seed before the default model is built.
        **runner_kwargs: further Runner arguments (resume, load_from, ...).
    """
    if model is None:
        torch.manual_seed(model_seed)
        model = BPTWhiteningToyModel(
            backbone=dict(prompt=None if prompt is None else dict(prompt)))
    default_hooks = dict(default_hooks or {})
    if dataset is None:
        dataset = dict(type='BPTWhiteningToyDataset', num_images=num_images)
    if train_cfg is None:
        train_cfg = dict(by_epoch=False, max_iters=max_iters)
    if optim_wrapper is None:
        optim_wrapper = dict(optimizer=dict(type='SGD', lr=lr))
    if checkpoint_interval is not None:
        default_hooks['checkpoint'] = dict(
            type='CheckpointHook', by_epoch=False,
            interval=checkpoint_interval)
    if log_interval is not None:
        default_hooks['logger'] = dict(type='LoggerHook',
                                       interval=log_interval)
    runner_kwargs.setdefault('experiment_name',
                             f'toy_{uuid.uuid4().hex[:8]}')
    runner_kwargs.setdefault('log_level', 'WARNING')
    return Runner(
        model=model, work_dir=str(work_dir),
        train_dataloader=dict(dataset=dataset,
                              sampler=dict(type=sampler, shuffle=shuffle),
                              batch_size=batch_size, num_workers=0),
        train_cfg=train_cfg, optim_wrapper=optim_wrapper,
        custom_hooks=list(hooks), default_hooks=default_hooks,
        randomness=dict(seed=seed), **runner_kwargs)


# --------------------------------------------------------------------------
# Two-process worker (forked by the test)
# --------------------------------------------------------------------------
DEEP_PROMPT = dict(type='WhitenedPrompt', num_tokens=4, depth='deep')
DIST_OPTIONS = dict(eps=1e-3)


def deep_backbone() -> PromptedViT:
    """Deep fWhiten prompts at every block.

    The attention outputs are scaled up 10x: with timm's random init
    (std 0.02) they are ~1e-3 of the residual, so earlier prompts would
    barely change the tokens of later blocks, unlike in a trained ViT.
    """
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(DEEP_PROMPT))
    with torch.no_grad():
        for block in backbone.blocks:
            block.attn.proj.weight.mul_(10)
    return backbone


def distributed_worker(rank: int, world: int, init_file: str,
                       out_dir: str) -> None:
    """Each rank whitens its half of the images; then rank 1 fails."""
    # The parent's OpenMP thread pool does not survive fork().
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        stats = WhiteningOptions(**DIST_OPTIONS)
        images = toy_images(16)
        half = len(images) // world
        mine = images[rank * half:(rank + 1) * half]
        results = collect_whitening(deep_backbone(), mine.split(3), stats,
                                    num_images=half)
        torch.save(results, f'{out_dir}/rank{rank}.pt')

        bad = mine.clone()
        if rank == 1:
            bad[1, 0, 0, 0] = float('nan')
        start = time.monotonic()
        try:
            collect_whitening(deep_backbone(), bad.split(3), stats,
                              num_images=half)
            message = None
        except RuntimeError as exc:
            message = str(exc)
        torch.save({'message': message,
                    'seconds': time.monotonic() - start},
                   f'{out_dir}/error{rank}.pt')
    finally:
        dist.destroy_process_group()
