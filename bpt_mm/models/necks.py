"""Simple feature pyramid for single-scale ViT features (ViTDet style).

mmdet's ViTDet project, which has one, is not part of the mmdet wheel, so
bpt_mm carries its own. For mmseg, use mmseg's ``Feature2Pyramid`` or
``MultiLevelNeck`` with the backbone's tuple of maps.
"""
from typing import List, Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from bpt_mm.registry import register_model


@register_model(name='LN2d')
class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map.

    Registered as ``'LN2d'``, so mmcv's ``build_norm_layer`` (and with it
    mmdet's ``ConvModule``-based heads) accepts ``norm_cfg=dict(type='LN2d')``
    as in ViTDet's heads; mmdet 3.3.0 itself has no such norm. The class
    default ``eps=1e-6`` is that of mmdet's ViTDet ``LN2d`` class, but
    ``build_norm_layer`` sets ``eps`` to 1e-5 unless the config gives one, so
    ViTDet's heads and pyramid (built that way) run with 1e-5.
    """

    #: Layer-name abbreviation for ``build_norm_layer`` (``ln``, ``ln1``...).
    _abbr_ = 'ln'

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        # Contiguous NCHW: the permuted view is channels-last in memory, and
        # mmcv's compiled ops read raw NCHW memory (its CPU RoIAlign returned
        # features of the wrong places from a SimpleFeaturePyramid level
        # that ends with this norm, so the RoI heads never learned).
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1,
                                                        2).contiguous()


#: The LayerNorm eps of mmdet's ViTDet pyramid: its ``LN2d`` is built by
#: mmcv's ``build_norm_layer``, which defaults ``eps`` to 1e-5.
VITDET_NORM_EPS = 1e-5


def _norm(kind: str, channels: int, eps: float = VITDET_NORM_EPS
          ) -> nn.Module:
    if kind == 'LN':
        return LayerNorm2d(channels, eps=eps)
    if kind == 'BN':
        return nn.BatchNorm2d(channels)
    if kind is None or kind == 'none':
        return nn.Identity()
    raise ValueError(f"`norm` must be 'LN', 'BN' or None, got {kind!r}")


@register_model()
class SimpleFeaturePyramid(BaseModule):
    """Build a pyramid from the last ViT map by (de)convolution and pooling.

    For an input at stride ``s`` (16 for ViT-B/16), scale factors
    ``(4, 2, 1, 0.5)`` give strides ``s/4, s/2, s, 2s``; ``num_outs=5`` adds a
    max-pooled level on top for the RPN (strides 4 to 64 for ``s = 16``).
    Each level ends with a 1x1 and a 3x3 convolution, each followed by the
    norm, to ``out_channels``.

    Args:
        in_channels (int): Channels of the ViT map.
        out_channels (int): Channels of every output level.
        scale_factors (sequence[float]): Up/down-sampling of each level;
            each must be one of 4, 2, 1, 0.5.
        num_outs (int): Number of outputs; levels beyond
            ``len(scale_factors)`` are stride-2 max pools of the last one.
        norm (str): ``'LN'`` (ViTDet, default), ``'BN'`` or None.
        norm_eps (float): eps of the ``'LN'`` norms. Defaults to 1e-5, what
            mmdet's ViTDet config gets from ``build_norm_layer``, so that a
            ViTDet checkpoint of the pyramid reproduces its features.
        init_cfg (dict, optional): mmengine init config.

    Examples:
        >>> import torch
        >>> neck = SimpleFeaturePyramid(in_channels=768, out_channels=256)
        >>> [o.shape[-1] for o in neck((torch.rand(1, 768, 8, 8), ))]
        [32, 16, 8, 4, 2]
    """

    def __init__(self, in_channels: int, out_channels: int = 256,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5, norm: str = 'LN',
                 norm_eps: float = VITDET_NORM_EPS,
                 init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        allowed = (4.0, 2.0, 1.0, 0.5)
        if not scale_factors or any(s not in allowed for s in scale_factors):
            raise ValueError(f'`scale_factors` entries must be in {allowed}, '
                             f'got {scale_factors!r}')
        if num_outs < len(scale_factors):
            raise ValueError(f'`num_outs` ({num_outs}) must be at least '
                             f'len(scale_factors) ({len(scale_factors)})')
        if isinstance(norm_eps, bool) or not isinstance(
                norm_eps, (int, float)) or not 0 < norm_eps < 1:
            raise ValueError(f'`norm_eps` must be a number in (0, 1), got '
                             f'{norm_eps!r}')
        _norm(norm, 1)  # validates `norm` before building anything
        self.num_outs = num_outs
        self.stages = nn.ModuleList()
        for scale in scale_factors:
            layers: List[nn.Module] = []
            dim = in_channels
            if scale == 4.0:
                layers += [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    _norm(norm, dim // 2, norm_eps), nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)
                ]
                dim //= 4
            elif scale == 2.0:
                layers.append(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
                dim //= 2
            elif scale == 0.5:
                layers.append(nn.MaxPool2d(2, stride=2))
            layers += [
                nn.Conv2d(dim, out_channels, 1, bias=norm is None),
                _norm(norm, out_channels, norm_eps),
                nn.Conv2d(out_channels, out_channels, 3, padding=1,
                          bias=norm is None),
                _norm(norm, out_channels, norm_eps),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """Take the last map of the backbone's tuple; return the pyramid."""
        x = inputs[-1]
        outs = [stage(x) for stage in self.stages]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
