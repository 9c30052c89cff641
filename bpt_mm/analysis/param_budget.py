"""Trainable-parameter budget of BPT variants, in the paper's units.

The paper counts trainable parameters in units of 10^-2 M (7.68 = 76,800).
:data:`BUILTIN_VARIANTS` are the prompt settings of its ablation (ViT-B,
m = 100 shallow prompts: VPT, SPT, BPT-fWhiten, BPT-tWhiten, BPT-bilinear with
p = 25/50/75/100) and its deep BPT (m = p = 50, the projection trained in
the top 4 blocks); :func:`variant_backbone` builds each as a real
:class:`~bpt_mm.models.PromptedViT`, on the meta device by default so no
memory is spent on the frozen ViT. :func:`budget_row` groups any model's
trainable parameters with :func:`bpt_mm.utils.trainable_parameters` and
:func:`markdown_table` prints the rows.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from bpt_mm.utils import trainable_parameters

__all__ = ['BUILTIN_VARIANTS', 'COLUMNS', 'variant_backbone', 'budget_row',
           'builtin_rows', 'markdown_table', 'in_paper_units']

#: Variant name -> prompt config (``num_tokens`` is filled in).
BUILTIN_VARIANTS: Dict[str, dict] = OrderedDict([
    ('vpt', dict(type='VPTPrompt')),
    # SPT: VPT's parameters, initialised from data (same count).
    ('spt', dict(type='SPTPrompt')),
    ('bpt_fwhiten', dict(type='WhitenedPrompt', tunable=False)),
    ('bpt_twhiten', dict(type='WhitenedPrompt', tunable=True)),
    ('bpt_bilinear_p25', dict(type='BilinearPrompt', rank=25)),
    ('bpt_bilinear_p50', dict(type='BilinearPrompt', rank=50)),
    ('bpt_bilinear_p75', dict(type='BilinearPrompt', rank=75)),
    ('bpt_bilinear_p100', dict(type='BilinearPrompt', rank=100)),
    # The authors' deep BPT: A in all 12 blocks, B trained in blocks 8-11.
    ('bpt_bilinear_deep_m50_p50', dict(type='BilinearPrompt', rank=50,
                                       num_tokens=50, depth='deep')),
])
#: Groups of the table, in order (``total`` is every trainable parameter).
COLUMNS = ('prompts', 'whitening', 'backbone', 'neck', 'heads', 'total')


def variant_backbone(name: str, arch: Union[str, dict] = 'base',
                     num_tokens: int = 100,
                     device: Union[str, torch.device] = 'meta') -> nn.Module:
    """A PromptedViT with the prompts of a built-in variant.

    Args:
        name (str): A key of :data:`BUILTIN_VARIANTS`.
        arch (str | dict): ViT architecture. Defaults to ``'base'``.
        num_tokens (int): ``m`` (a variant that fixes its own keeps it).
            Defaults to 100.
        device: Where to build. Defaults to ``'meta'`` (shapes only).

    Returns:
        PromptedViT: With a frozen backbone.

    Raises:
        ValueError: Unknown ``name``; the message lists the variants.
    """
    if name not in BUILTIN_VARIANTS:
        raise ValueError(f'unknown variant {name!r}; built-in variants: '
                         f'{list(BUILTIN_VARIANTS)}')
    from bpt_mm.models import PromptedViT
    prompt = dict(BUILTIN_VARIANTS[name])
    prompt.setdefault('num_tokens', num_tokens)
    with torch.device(device):
        return PromptedViT(arch=arch, prompt=prompt, frozen=True)


def budget_row(model: nn.Module) -> Dict[str, Optional[int]]:
    """Trainable parameters per column of :data:`COLUMNS`.

    A bare backbone has no neck or heads: those entries are None.
    """
    counts = trainable_parameters(model)
    bare = not hasattr(getattr(model, 'module', model), 'backbone')
    row: Dict[str, Optional[int]] = {}
    for column in COLUMNS:
        if column == 'total':
            row[column] = counts['all']['trainable']
        elif bare and column in ('neck', 'heads'):
            row[column] = None
        else:
            row[column] = counts[column]['trainable']
    return row


def in_paper_units(count: Optional[int]) -> str:
    """``76800 -> '7.68'`` (units of 10^-2 M, two decimals); None -> '-'.

    Examples:
        >>> in_paper_units(666624), in_paper_units(None)
        ('66.66', '-')
    """
    return '-' if count is None else f'{count / 1e4:.2f}'


def markdown_table(rows: Dict[str, Dict[str, Optional[int]]]) -> str:
    """A Markdown table of :func:`budget_row` results, in 10^-2 M."""
    lines = ['| model | ' + ' | '.join(COLUMNS) + ' |',
             '|---|' + '---:|' * len(COLUMNS)]
    for name, row in rows.items():
        lines.append(f'| {name} | ' + ' | '.join(
            in_paper_units(row[c]) for c in COLUMNS) + ' |')
    return '\n'.join(lines)


def builtin_rows(names: Optional[List[str]] = None,
                 arch: Union[str, dict] = 'base',
                 num_tokens: int = 100) -> Dict[str, Dict[str, Optional[int]]]:
    """:func:`budget_row` of each built-in variant.

    Args:
        names (list[str], optional): Keys of :data:`BUILTIN_VARIANTS`.
            Defaults to all of them.
        arch (str | dict): The ViT arch. Defaults to ``'base'``.
        num_tokens (int): Prompt tokens per block. Defaults to 100.

    Returns:
        dict: Variant name -> its :func:`budget_row`, in ``names`` order.
    """
    names = list(BUILTIN_VARIANTS) if names is None else names
    return OrderedDict((name, budget_row(variant_backbone(name, arch,
                                                          num_tokens)))
                       for name in names)
