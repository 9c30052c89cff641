"""Layer-wise learning-rate decay for a ViT backbone (full fine-tuning).

Full fine-tuning of an MAE ViT for detection and segmentation (ViTDet; BEiT
and MAE for UperNet) scales the learning rate of block ``i`` of an ``L``-block
ViT by ``rate ** (L - i)``: the lower, more generic layers move less than the
upper ones, and the neck and heads, which start from scratch, get the full
rate. The depth of each parameter comes from the backbone's own
``get_layer_depth`` (implemented by :class:`bpt_mm.models.PromptedViT`), so
the rule lives next to the model that defines the layers.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper

from bpt_mm.registry import register_optim_wrapper_constructor

#: Keys ``paramwise_cfg`` accepts.
PARAMWISE_KEYS = ('layer_decay_rate', )

#: Parameter names (relative to the backbone) that are never weight-decayed,
#: besides every 1-D parameter (norm scales/shifts, biases). Decay would pull
#: the position embedding and the class token towards zero, which carries no
#: regularising meaning for them; prompt parameters include whitening
#: matrices and whitening-initialised bases, which decay would pull away from
#: their data-driven initialisation.
NO_DECAY_NAMES = ('pos_embed', 'cls_token')
NO_DECAY_PREFIXES = ('prompts.', )


@register_optim_wrapper_constructor()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Optimizer wrapper constructor with layer-wise learning-rate decay.

    Every trainable parameter gets ``lr = base_lr * rate ** (D - 1 - depth)``
    where ``depth, D = model.backbone.get_layer_depth(name, 'backbone.')``:
    for :class:`~bpt_mm.models.PromptedViT` the patch embedding, class token
    and position embedding are depth 0, block ``i`` (and the prompts entering
    it) ``i + 1``, and everything else (final norm, neck, heads) ``D - 1``,
    which keeps the base rate.

    Weight decay is ``base_wd`` except for 1-D parameters (norms, biases),
    ``pos_embed`` and ``cls_token`` (the ViTDet/mmpretrain convention) and
    prompt parameters (decay would pull a whitening initialisation towards
    zero), which get 0. Parameters with ``requires_grad=False``
    (a frozen backbone) are left out of the optimizer altogether, so its
    state holds nothing for them. Parameters with the same depth and decay
    share one parameter group.

    Args:
        optim_wrapper_cfg (dict): The optimizer wrapper config, as for
            mmengine's ``DefaultOptimWrapperConstructor``; its ``optimizer``
            must give ``lr``.
        paramwise_cfg (dict): ``dict(layer_decay_rate=RATE)`` with ``RATE``
            a float in (0, 1]; 1 means no decay (only the weight-decay rules
            and the exclusion of frozen parameters apply).

    Raises:
        ValueError: ``paramwise_cfg.layer_decay_rate`` is missing or not in
            (0, 1], ``paramwise_cfg`` has another key, the optimizer has no
            ``lr``, the model has no backbone with ``get_layer_depth``, or
            nothing in the model is trainable.

    Examples:
        In a config (ViTDet's full fine-tuning setting)::

            optim_wrapper = dict(
                type='OptimWrapper',
                constructor='LayerDecayOptimWrapperConstructor',
                optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                               weight_decay=0.1),
                paramwise_cfg=dict(layer_decay_rate=0.7))

        Directly:

        >>> import torch.nn as nn
        >>> from bpt_mm.models import PromptedViT
        >>> model = nn.Module()
        >>> model.backbone = PromptedViT(
        ...     arch=dict(embed_dims=8, num_layers=2, num_heads=2),
        ...     img_size=32, frozen=False)
        >>> model.head = nn.Linear(8, 2)
        >>> constructor = LayerDecayOptimWrapperConstructor(
        ...     dict(optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.1)),
        ...     dict(layer_decay_rate=0.5))
        >>> groups = []
        >>> constructor.add_params(groups, model)
        >>> sorted({g['lr'] for g in groups})
        [0.125, 0.25, 0.5, 1.0]
    """

    def __init__(self, optim_wrapper_cfg: dict,
                 paramwise_cfg: Optional[dict] = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        unknown = sorted(set(cfg) - set(PARAMWISE_KEYS))
        if unknown:
            raise ValueError(
                f'LayerDecayOptimWrapperConstructor: unknown key(s) '
                f'{["paramwise_cfg." + k for k in unknown]}; allowed: '
                f'{["paramwise_cfg." + k for k in PARAMWISE_KEYS]}')
        if 'layer_decay_rate' not in cfg:
            raise ValueError(
                'LayerDecayOptimWrapperConstructor needs '
                '`paramwise_cfg.layer_decay_rate`: a float in (0, 1] (e.g. '
                '0.7 as ViTDet; 1.0 for no decay)')
        rate = cfg['layer_decay_rate']
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not 0 < rate <= 1:
            raise ValueError(
                f'`paramwise_cfg.layer_decay_rate` must be a float in (0, 1] '
                f'(e.g. 0.7 as ViTDet; 1.0 for no decay), got {rate!r}')
        if self.base_lr is None:
            raise ValueError(
                'LayerDecayOptimWrapperConstructor needs `optimizer.lr`: the '
                'layer-wise rates are fractions of it')
        self.layer_decay_rate = float(rate)
        self._summary = ''

    @staticmethod
    def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
        """Whether parameter ``name`` (relative to the model) gets no
        weight decay."""
        if param.ndim <= 1:
            return True
        short = name[len('backbone.'):] if name.startswith('backbone.') \
            else None
        if short is None:
            return False
        return short in NO_DECAY_NAMES or short.startswith(NO_DECAY_PREFIXES)

    def add_params(self, params: List[dict], module: nn.Module,
                   prefix: str = '', **kwargs) -> None:
        """Append the parameter groups of ``module`` (the whole model).

        Unlike the parent, this is not recursive: it walks
        ``module.named_parameters()`` once, since a parameter's depth comes
        from its full name.

        Args:
            params (list[dict]): Parameter groups, appended to in place.
            module (nn.Module): The model (DDP/FSDP wrappers are unwrapped);
                it must have a ``backbone`` with ``get_layer_depth``.
            prefix (str): Must be empty: depths are looked up from names
                relative to the model.
            **kwargs: Ignored (the parent's ``is_dcn_module``).
        """
        if prefix:
            raise ValueError('LayerDecayOptimWrapperConstructor.add_params '
                             'takes the whole model (prefix ""), got prefix '
                             f'{prefix!r}')
        model = module.module if is_model_wrapper(module) else module
        backbone = getattr(model, 'backbone', None)
        if backbone is None or not callable(
                getattr(backbone, 'get_layer_depth', None)):
            raise ValueError(
                'LayerDecayOptimWrapperConstructor needs a model whose '
                '`backbone` has get_layer_depth(name, prefix) (e.g. '
                f'PromptedViT); got {type(model).__name__} with backbone '
                f'{type(backbone).__name__}')
        rate = self.layer_decay_rate
        groups: Dict[Tuple[int, bool], dict] = OrderedDict()
        num_depths = None
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue  # frozen: no optimizer state, no DDP bucket
            depth, num_depths = backbone.get_layer_depth(name,
                                                         prefix='backbone.')
            no_decay = self._no_weight_decay(name, param)
            key = (depth, no_decay)
            if key not in groups:
                group = dict(params=[],
                             lr=self.base_lr * rate**(num_depths - 1 - depth))
                if self.base_wd is not None:
                    group['weight_decay'] = 0. if no_decay else self.base_wd
                elif no_decay:
                    group['weight_decay'] = 0.
                groups[key] = group
            groups[key]['params'].append(param)
        if not groups:
            raise ValueError('LayerDecayOptimWrapperConstructor: the model '
                             'has no parameter with requires_grad=True')
        ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
        params.extend(group for _, group in ordered)
        self._summary = self._describe(ordered, num_depths)

    def _describe(self, ordered: List[Tuple[Tuple[int, bool], dict]],
                  num_depths: int) -> str:
        """One line per parameter group: depth, decay, lr scale, size."""
        lines = [f'LayerDecayOptimWrapperConstructor: layer_decay_rate '
                 f'{self.layer_decay_rate}, {num_depths} depths']
        for (depth, no_decay), group in ordered:
            scale = group['lr'] / self.base_lr
            kind = 'no-decay' if no_decay else 'decay'
            lines.append(f"  depth {depth:>2} {kind:<8} lr x {scale:.4g}: "
                         f"{len(group['params'])} tensors")
        return '\n'.join(lines)

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optimizer wrapper and log its parameter groups."""
        optim_wrapper = super().__call__(model)
        print_log(self._summary, logger='current', level=logging.INFO)
        return optim_wrapper
