"""``PromptStatsHook``: per prompted block, how the prompts train.

Every ``interval`` training iterations (the iterations ``LoggerHook`` with
the same interval logs) the hook records, for each prompted block ``i`` of
the PromptedViT backbone, into mmengine's message hub as ``train/...``
scalars, so they appear in the text log and every visualiser backend
(TensorBoard, WandB...):

* ``prompt_norm/block<i>``: the Frobenius norm of the effective prompt
  ``P~`` (m x d), without dropout;
* ``prompt_logit_kurtosis/block<i>``: Pearson's kurtosis (3 for a Gaussian)
  of the prompt logits ``P~ M X^T`` against the patch tokens ``X`` entering
  block ``i`` in the current batch (only patches of the real image, by each
  data sample's ``img_shape``; see :mod:`bpt_mm.whitening.real_tokens`),
  ``M = W_q^T W_k`` (biases, LayerNorm and the head scale aside, as the
  paper's ``X~``): how bursty the logits the prompts learn from are;
* ``whitening_drift/block<i>``: for a trained whitening (BPT-tWhiten),
  ``||W - W_0||_F / ||W_0||_F`` with ``W_0`` its value when training
  started (kept in checkpoints, so a resumed run measures from the same
  ``W_0``).

The cost is one forward pass without gradients up to and including the
highest prompted block on the logged iterations only (shallow prompts: the
patch embedding and block 0), in eval mode so no random numbers are drawn;
the images are those the backbone received in that iteration, captured by
a forward pre-hook that exists only during logged iterations. Under DDP
each process measures its own batch; the logger shows rank 0's.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from mmengine.hooks import Hook
from torch import Tensor

from bpt_mm.analysis.burstiness import kurtosis
from bpt_mm.models.vit import find_prompted_backbone
from bpt_mm.registry import register_hook
from bpt_mm.whitening.collect import block_token_rows
from bpt_mm.whitening.linalg import query_key_product
from bpt_mm.whitening.options import WhiteningOptions, check_positive_int
from bpt_mm.whitening.real_tokens import (ImageBatch,
                                          check_no_pipeline_padding,
                                          img_shapes_of)

from .hook_options import refuse_unknown_options

#: Checkpoint key of the initial trained whitening matrices.
CHECKPOINT_KEY = 'bpt_mm_prompt_stats'


def _trained_whitening(prompt: torch.nn.Module) -> Optional[Tensor]:
    """The prompt's whitening ``W`` if it is a trained parameter."""
    w = getattr(prompt, 'whitening', None)
    return w if isinstance(w, torch.nn.Parameter) else None


def prompt_statistics(backbone: Any, images: Tensor,
                      initial_whitening: Dict[int, Tensor],
                      options: Optional[WhiteningOptions] = None,
                      img_shapes: Optional[Sequence[Tuple[int, int]]] = None
                      ) -> Dict[str, float]:
    """The hook's scalars for one batch of preprocessed images.

    Args:
        backbone (PromptedViT): With prompts; run in eval mode without
            gradients (its mode is restored).
        images (Tensor): ``(B, C, H, W)`` as the backbone received them.
        initial_whitening (dict[int, Tensor]): ``W_0`` per block with a
            trained whitening (blocks without an entry get no drift).
        options (WhiteningOptions, optional): Token source and product;
            default the paper's.
        img_shapes (Sequence[tuple[int, int]], optional): Real ``(h, w)``
            of each image; patches that cover only padding are then left
            out of the logits (see :mod:`bpt_mm.whitening.real_tokens`).

    Returns:
        dict[str, float]: ``{'prompt_norm/block<i>': ..., ...}``.
    """
    options = WhiteningOptions() if options is None else options
    prompts = backbone.prompt_modules()
    out: Dict[str, float] = {}
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            tokens, _ = block_token_rows(
                backbone, ImageBatch(images, img_shapes), sorted(prompts),
                options)
            for block, prompt in sorted(prompts.items()):
                effective = prompt().detach()  # P~, no dropout
                out[f'prompt_norm/block{block}'] = float(
                    effective.double().norm())
                product = query_key_product(
                    backbone.blocks[block].attn.qkv.weight.detach(),
                    order=options.product)
                x = tokens[block]
                # (m, d) @ (d, d) @ (d, N): one logit per prompt and token
                logits = (effective @ product.to(effective.dtype)) @ x.to(
                    effective.dtype).T
                out[f'prompt_logit_kurtosis/block{block}'] = kurtosis(logits)
                w = _trained_whitening(prompt)
                if w is not None and block in initial_whitening:
                    w0 = initial_whitening[block].to(device=w.device,
                                                     dtype=torch.float64)
                    out[f'whitening_drift/block{block}'] = float(
                        (w.detach().double() - w0).norm() / w0.norm())
    finally:
        backbone.train(was_training)
    return out


@register_hook()
class PromptStatsHook(Hook):
    """Log prompt norms, prompt-logit kurtosis and whitening drift.

    Off unless listed in ``custom_hooks`` (the BPT configs list it)::

        custom_hooks = [dict(type='PromptStatsHook', interval=50)]

    See the module docstring for the scalars. Give it the ``LoggerHook``'s
    interval so every logged line carries fresh values.

    Args:
        interval (int): Measure every this many training iterations.
            Defaults to 50 (mmdet's and mmseg's logging interval).
        source (str): ``'block_input'`` (default, the tokens entering the
            block, as the whitening) or ``'norm1'``.
        product (str): ``'qk'`` (default), ``'kq'``, ``'authors'`` or
            ``'authors_mae'``
            (see :func:`bpt_mm.whitening.linalg.query_key_product`).
    """

    # before_train: after BPTWhiteningHook (ABOVE_NORMAL) has written W_0;
    # after_train_iter: before LoggerHook (BELOW_NORMAL) reads the hub.
    priority = 'NORMAL'

    def __init__(self, interval: int = 50,
                 source: str = WhiteningOptions.source,
                 product: str = WhiteningOptions.product,
                 **unknown: Any) -> None:
        refuse_unknown_options('PromptStatsHook', PromptStatsHook.__init__,
                               unknown)
        check_positive_int(interval, 'PromptStatsHook `interval`')
        try:
            # WhiteningOptions checks `source` and `product`.
            self.options = WhiteningOptions(source=source, product=product)
        except ValueError as exc:
            raise ValueError(f'PromptStatsHook {exc}') from None
        self.interval = interval
        self.initial_whitening: Dict[int, Tensor] = {}
        self._backbone = None
        self._handle = None
        self._images: Optional[Tensor] = None
        self._img_shapes: Optional[Tuple[Tuple[int, int], ...]] = None
        self._warned = False
        #: The scalars of the last measurement (without ``train/``).
        self.last: Dict[str, float] = {}

    # ------------------------------------------------------------- set-up
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        stored = checkpoint.get(CHECKPOINT_KEY) or {}
        self.initial_whitening = {
            int(k): v.detach().clone().cpu()
            for k, v in (stored.get('initial_whitening') or {}).items()}

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.initial_whitening:
            checkpoint[CHECKPOINT_KEY] = {'initial_whitening': {
                str(k): v for k, v in self.initial_whitening.items()}}

    def before_train(self, runner) -> None:
        backbone = find_prompted_backbone(runner.model)
        if backbone is None or not backbone.prompt_modules():
            runner.logger.warning('PromptStatsHook: the model has no '
                                  'prompted PromptedViT backbone; nothing '
                                  'to log')
            return
        # A pipeline `Pad` makes every img_shape the padded size: the
        # statistics would count padding patches as image, unseen.
        loader = getattr(runner, 'train_dataloader', None)
        check_no_pipeline_padding(getattr(loader, 'dataset', None),
                                  'PromptStatsHook (prompt-logit kurtosis)')
        self._backbone = backbone
        for block, prompt in backbone.prompt_modules().items():
            w = _trained_whitening(prompt)
            if w is not None and block not in self.initial_whitening:
                # A fresh run (or a checkpoint without W_0): measure from
                # the whitening that training starts with.
                self.initial_whitening[block] = w.detach().clone().cpu()

    # ------------------------------------------------------------ per iter
    def _capture(self, module, args) -> None:
        if self._images is None and args and isinstance(args[0], Tensor):
            self._images = args[0].detach()

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Any = None) -> None:
        if self._backbone is None or \
                not self.every_n_train_iters(runner, self.interval):
            return
        self._images = None
        samples = data_batch.get('data_samples') \
            if isinstance(data_batch, dict) else None
        # The real size of each image, so padding patches stay out of the
        # logits; None (every patch counts) when the samples carry none.
        self._img_shapes = img_shapes_of(samples)
        if self._img_shapes is None and samples and not self._warned:
            self._warned = True  # once: it holds for the whole data set
            runner.logger.warning(
                'PromptStatsHook: the data samples carry no img_shape, so '
                'padding patches count as image tokens in the logits')
        self._handle = self._backbone.register_forward_pre_hook(
            self._capture)

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Any = None, outputs: Any = None) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        images, self._images = self._images, None
        shapes, self._img_shapes = self._img_shapes, None
        if images is None:
            return  # the backbone did not run in this iteration
        if shapes is not None and len(shapes) != images.shape[0]:
            runner.logger.warning(
                f'PromptStatsHook: {len(shapes)} data samples for '
                f'{images.shape[0]} images reaching the backbone; padding '
                'patches count as image tokens in this measurement')
            shapes = None
        if shapes is not None:
            height, width = images.shape[-2:]
            shapes = tuple((min(h, height), min(w, width))
                           for h, w in shapes)
        self.last = prompt_statistics(self._backbone, images,
                                      self.initial_whitening,
                                      self.options, shapes)
        for key, value in self.last.items():
            runner.message_hub.update_scalar(f'train/{key}', value)

    def after_train(self, runner) -> None:
        if self._handle is not None:  # training stopped mid-iteration
            self._handle.remove()
            self._handle = None
