"""The environment contract: compiled mmcv ops, version ranges, registries."""
import pytest

from bpt_mm.compat import SUPPORTED, check_versions, installed_version


def test_mmcv_ops_importable():
    from mmcv.ops import RoIAlign, nms  # noqa: F401  compiled extension
    import torch
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.],
                          [20., 20., 30., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feats = torch.arange(16.).view(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 2., 2.]])
    out = RoIAlign((1, 1), spatial_scale=1.0, sampling_ratio=1,
                   aligned=False)(feats, rois)
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(5.0)  # bilinear value at (1, 1)


def test_installed_versions_are_in_range():
    versions = {name: installed_version(name) for name in SUPPORTED}
    check_versions(versions)  # raises if anything is out of range
    for name in ('mmcv', 'mmdet', 'mmsegmentation'):
        assert versions[name] is not None, f'{name} is not installed'


def _ok_versions():
    return {name: low for name, (low, _, _) in SUPPORTED.items()}


@pytest.mark.parametrize('package, version', [
    ('mmcv', '2.2.0'),
    ('mmcv', '1.7.1'),
    ('mmdet', '3.2.0'),
    ('mmsegmentation', '1.3.0'),
    ('torch', '1.13.1'),
])
def test_out_of_range_version_is_refused_with_fix(package, version):
    versions = _ok_versions()
    versions[package] = version
    with pytest.raises(ImportError) as err:
        check_versions(versions)
    msg = str(err.value)
    assert f'{package}=={version}' in msg
    low, high, _ = SUPPORTED[package]
    assert f'{package}>={low},<{high}' in msg
    assert 'make test' in msg  # says how to fix


def test_missing_required_package_and_mmcv_without_ops():
    versions = _ok_versions()
    versions['mmengine'] = None
    with pytest.raises(ImportError, match='mmengine is not installed'):
        check_versions(versions)
    with pytest.raises(ImportError, match='without its compiled ops'):
        check_versions(_ok_versions(), mmcv_has_ops=False)
    optional = _ok_versions()
    optional['mmdet'] = None  # a segmentation-only user
    check_versions(optional)


def test_registered_everywhere():
    import mmengine.registry
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    import bpt_mm  # noqa: F401
    from bpt_mm.models import PromptedViT, SimpleFeaturePyramid
    for registry in (mmengine.registry.MODELS, MMDET_MODELS, MMSEG_MODELS):
        assert registry.get('PromptedViT') is PromptedViT
        assert registry.get('bpt_mm.PromptedViT') is PromptedViT
        assert registry.get('SimpleFeaturePyramid') is SimpleFeaturePyramid


def test_requirement_ranges_are_the_ones_compat_checks():
    """requirements/ (what pip installs) and compat.py (what import bpt_mm
    checks) declare the same ranges, so `make test-min-timm` tests the
    bound both state."""
    import os.path as osp
    import re

    from packaging.requirements import Requirement
    from packaging.version import Version
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    declared = {}
    for name in ('runtime.txt', 'mminstall.txt'):
        with open(osp.join(root, 'requirements', name)) as f:
            for line in f:
                line = line.split('#')[0].strip()
                if line and re.match(r'^[A-Za-z0-9_.-]+\s*[<>=]', line):
                    req = Requirement(line)
                    declared[req.name] = req.specifier
    for package, (low, high, _) in SUPPORTED.items():
        if package == 'torch':  # pinned in requirements/torch.txt
            continue
        spec = declared[package]
        bounds = {s.operator: Version(s.version) for s in spec}
        assert bounds == {'>=': Version(low), '<': Version(high)}, package
