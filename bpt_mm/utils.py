"""Trainable-parameter accounting, per group, for any bpt_mm model."""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn

GROUPS = ('prompts', 'whitening', 'backbone', 'neck', 'heads')


def parameter_group(name: str, is_bare_backbone: bool = False) -> str:
    """Group of a parameter name: prompts, whitening, backbone, neck, heads.

    ``whitening`` holds whitening matrices (trainable in BPT-tWhiten); the
    bilinear basis ``B`` counts as a prompt parameter, since it is one of the
    two factors of the prompt.
    """
    parts = name.split('.')
    if 'prompts' in parts:
        return 'whitening' if parts[-1] == 'whitening' else 'prompts'
    if is_bare_backbone or parts[0] == 'backbone':
        return 'backbone'
    if parts[0] == 'neck':
        return 'neck'
    return 'heads'


def trainable_parameters(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """Count parameters per group.

    Args:
        model (nn.Module): A detector/segmentor (``backbone``, ``neck``,
            heads) or a bare backbone. DDP wrappers are unwrapped.

    Returns:
        dict: ``{group: {'trainable': int, 'total': int}}`` for each group in
        :data:`GROUPS`, plus ``'all'``. Buffers (frozen whitening matrices, a
        frozen bilinear basis) are not parameters and are not counted.

    Examples:
        >>> from bpt_mm.models import PromptedViT
        >>> vit = PromptedViT(arch='base', prompt=dict(type='VPTPrompt',
        ...                                            num_tokens=100))
        >>> trainable_parameters(vit)['prompts']['trainable']
        76800
    """
    model = getattr(model, 'module', model)
    bare = not hasattr(model, 'backbone')
    counts = OrderedDict(
        (g, dict(trainable=0, total=0)) for g in GROUPS + ('all', ))
    for name, param in model.named_parameters():
        for group in (parameter_group(name, bare), 'all'):
            counts[group]['total'] += param.numel()
            if param.requires_grad:
                counts[group]['trainable'] += param.numel()
    return dict(counts)


def format_trainable_parameters(model: nn.Module) -> str:
    """A readable table of :func:`trainable_parameters`, in the paper's units.

    The paper counts parameters in units of 10^-2 M (7.68 = 76,800).
    """
    counts = trainable_parameters(model)
    total = counts['all']['total'] or 1
    lines = [f"{'group':<10} {'trainable':>12} {'total':>13} "
             f"{'x1e-2 M':>9} {'% of model':>10}"]
    for group, c in counts.items():
        lines.append(f"{group:<10} {c['trainable']:>12,} {c['total']:>13,} "
                     f"{c['trainable'] / 1e4:>9.2f} "
                     f"{100.0 * c['trainable'] / total:>9.3f}%")
    return '\n'.join(lines)


def find_hook_entry(cfg: Any, names: Sequence[str]) -> Optional[dict]:
    """The first entry of ``cfg.custom_hooks`` whose ``type`` is one of
    ``names`` (a registered name, or the class itself as pure-Python
    configs give it), or None."""
    for entry in cfg.get('custom_hooks', None) or []:
        if not isinstance(entry, dict):
            continue
        kind = entry.get('type')
        name = kind if isinstance(kind, str) else getattr(kind, '__name__',
                                                          None)
        if name in names:
            return entry
    return None
