"""Drawing predictions with mmdet's and mmseg's visualizers, which is
where the OpenCV version matters (OpenCV 5.0 was reported to break
mmseg's drawing): the installed OpenCV is inside the range
requirements/runtime.txt pins, and both visualizers draw with it."""
import os.path as osp

import numpy as np
import torch
from packaging.requirements import Requirement

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def pinned(name):
    with open(osp.join(ROOT, 'requirements', 'runtime.txt')) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line and Requirement(line).name == name:
                return Requirement(line).specifier
    raise AssertionError(f'{name} is not in requirements/runtime.txt')


def test_installed_opencv_is_in_the_pinned_range():
    import cv2
    spec = pinned('opencv-python-headless')
    assert spec, 'opencv-python-headless is not constrained'
    assert cv2.__version__ in spec, (cv2.__version__, str(spec))


def test_mmseg_draws_labelled_masks(tmp_path):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    from mmseg.visualization import SegLocalVisualizer
    image = np.full((48, 64, 3), 128, np.uint8)
    labels = torch.zeros(1, 48, 64, dtype=torch.long)
    labels[:, 8:40, 8:30] = 1
    labels[:, 10:30, 36:60] = 2
    sample = SegDataSample()
    sample.pred_sem_seg = PixelData(data=labels)
    sample.gt_sem_seg = PixelData(data=labels.clone())
    visualizer = SegLocalVisualizer(
        name='bpt_mm_test_seg', save_dir=str(tmp_path),
        vis_backends=[dict(type='LocalVisBackend')], alpha=0.8)
    visualizer.dataset_meta = dict(
        classes=('background', 'square', 'disk'),
        palette=[[0, 0, 0], [220, 40, 40], [40, 200, 60]])
    out = tmp_path / 'seg.png'
    # with_labels=True draws each class name in a box: cv2.rectangle and
    # cv2.putText on the drawn mask
    visualizer.add_datasample('seg', image, sample, with_labels=True,
                              out_file=str(out))
    import cv2
    drawn = cv2.imread(str(out))
    assert drawn.shape == (48, 128, 3)  # ground truth beside prediction
    assert (drawn != 128).any()


def test_mmdet_draws_boxes_and_masks(tmp_path):
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData
    image = np.full((64, 80, 3), 128, np.uint8)
    pred = InstanceData()
    pred.bboxes = torch.tensor([[8., 8., 40., 40.]])
    pred.scores = torch.tensor([0.9])
    pred.labels = torch.tensor([1])
    masks = torch.zeros(1, 64, 80, dtype=torch.bool)
    masks[0, 10:38, 10:38] = True
    pred.masks = masks
    sample = DetDataSample()
    sample.pred_instances = pred
    visualizer = DetLocalVisualizer(name='bpt_mm_test_det',
                                    save_dir=str(tmp_path))
    visualizer.dataset_meta = dict(
        classes=('square', 'disk', 'triangle'),
        palette=[(220, 40, 40), (40, 200, 60), (50, 80, 230)])
    out = tmp_path / 'det.png'
    visualizer.add_datasample('det', image, sample, draw_gt=False,
                              pred_score_thr=0.3, out_file=str(out))
    assert out.is_file()
    assert (visualizer.get_image() != 128).any()
