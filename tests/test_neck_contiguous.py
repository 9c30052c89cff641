"""SimpleFeaturePyramid / LayerNorm2d outputs as mmcv's compiled ops read
them (CPU): contiguous NCHW, so RoIAlign pools the intended places."""
import torch
from mmcv.ops import RoIAlign

from bpt_mm.models import LayerNorm2d
from bpt_mm.models.necks import SimpleFeaturePyramid


def test_layernorm2d_output_is_contiguous_nchw():
    out = LayerNorm2d(8)(torch.randn(2, 8, 5, 7))
    assert out.shape == (2, 8, 5, 7)
    assert out.is_contiguous()


def test_pyramid_levels_pool_the_same_as_their_contiguous_copies():
    """A channels-last level (the permuted LayerNorm view) made mmcv's CPU
    RoIAlign pool other places than the box: the tiny Mask R-CNN's RoI heads
    then never learned (demo bbox AP at chance)."""
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(in_channels=32, out_channels=16, num_outs=5)
    levels = neck((torch.randn(2, 32, 8, 10), ))
    rois = torch.tensor([[0, 10., 12., 60., 70.], [1, 80., 30., 150., 120.]])
    for level, stride in zip(levels[:4], (4, 8, 16, 32)):
        assert level.is_contiguous()
        align = RoIAlign((7, 7), spatial_scale=1.0 / stride,
                         sampling_ratio=0, aligned=True)
        assert torch.equal(align(level, rois),
                           align(level.contiguous(), rois))
