"""Trainable-only checkpoints in every loader: the module completes them.

PromptedViT itself fills a state dict that lacks its frozen weights from
the pretrained file (``init_cfg``'s, or the one the checkpoint records)
after checking the fingerprint, or refuses. Shown here with plain
``load_state_dict`` (strict and not), mmengine's ``load_checkpoint``, and
the inference APIs and tools of mmdet and mmseg that load checkpoints
without bpt_mm's hooks: ``init_detector``, ``DetInferencer``, mmseg's
``init_model`` and ``MMSegInferencer``, and mmdet's own ``tools/test.py``
(shipped in the mmdet package under ``.mim/tools``). Each gives the same
predictions on a trainable-only checkpoint as on the merged one, and
refuses when the pretrained file is gone.
"""
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config

from bpt_mm.models.checkpoint import CheckpointError
from bpt_mm.models.frozen_state import EXTRA_STATE_KEY, parse_extra_state
from bpt_mm.engine.trainable_state import strip_frozen_backbone
from helpers import small_vit

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(ROOT, 'configs', 'tiny')
ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, mlp_ratio=1.0)


def save_vit(path, arch, img_size, patch_size, seed):
    """A 'pretrained' ViT file in MAE's container, without bpt_mm's
    record (as a real pretrained file)."""
    torch.manual_seed(seed)
    vit = small_vit(arch=arch, img_size=img_size, patch_size=patch_size)
    torch.save({'model': {k: v for k, v in vit.state_dict().items()
                          if k != EXTRA_STATE_KEY}}, path)
    return str(path)


def prompted(pretrained=None):
    return small_vit(
        dict(type='VPTPrompt', num_tokens=2), arch=ARCH,
        init_cfg=None if pretrained is None else dict(
            type='Pretrained', checkpoint=pretrained))


# ------------------------------------------------------------- the module
def test_module_completes_or_refuses_a_state_dict_without_frozen_weights(
        tmp_path, one_thread):
    vit_file = save_vit(tmp_path / 'vit.pth', ARCH, 32, 8, seed=1)
    trained = prompted(vit_file)
    trained.init_weights()
    with torch.no_grad():
        trained.prompts['0'].tokens.normal_()  # 'trained' prompts
    full = trained.state_dict()
    record = parse_extra_state(full[EXTRA_STATE_KEY], EXTRA_STATE_KEY)
    assert record['pretrained_checkpoint'] == vit_file
    assert len(record['frozen_sha256']) == 64
    small = {k: v for k, v in full.items()
             if k.startswith('prompts.') or k == EXTRA_STATE_KEY}
    x = torch.rand(1, 3, 32, 32)
    expected = trained.eval()(x)[0]

    # strict and non-strict loads, init_cfg set, init_weights never called
    for strict in (True, False):
        model = prompted(vit_file)
        result = model.load_state_dict(small, strict=strict)
        assert not result.missing_keys and not result.unexpected_keys
        torch.testing.assert_close(model.eval()(x)[0], expected,
                                   rtol=0, atol=0)
    # without init_cfg (as mmdet's init_detector leaves it): from the
    # recorded file, whose fingerprint is checked
    model = prompted(None)
    model.load_state_dict(small, strict=False)
    torch.testing.assert_close(model.eval()(x)[0], expected, rtol=0, atol=0)
    # the caller's dict is not changed
    assert set(small) == {'prompts.0.tokens', EXTRA_STATE_KEY}

    # another pretrained file: refused naming both
    other = save_vit(tmp_path / 'other.pth', ARCH, 32, 8, seed=2)
    with pytest.raises(CheckpointError, match='is not the one this '
                       'checkpoint was trained on') as info:
        prompted(other).load_state_dict(small, strict=False)
    assert 'other.pth' in str(info.value) and 'vit.pth' in str(info.value)

    # the recorded file gone and no init_cfg: refused naming the file and
    # the way out, never run on random weights
    os.rename(vit_file, tmp_path / 'moved.pth')
    with pytest.raises(CheckpointError) as info:
        prompted(None).load_state_dict(small, strict=False)
    assert vit_file in str(info.value)
    assert 'tools/merge_checkpoint.py' in str(info.value)
    # no record at all (a file stripped by hand): nothing to check against
    bare = {'prompts.0.tokens': small['prompts.0.tokens']}
    with pytest.raises(CheckpointError, match='names a pretrained file'):
        prompted(None).load_state_dict(bare, strict=False)

    # a full state dict needs no file; one of an earlier version (no
    # record) loads strictly too
    old = {k: v for k, v in full.items() if k != EXTRA_STATE_KEY}
    for state in (full, old):
        model = prompted(None)
        model.load_state_dict(state, strict=True)
        torch.testing.assert_close(model.eval()(x)[0], expected,
                                   rtol=0, atol=0)


def test_mmengine_load_checkpoint_completes_a_nested_backbone(
        tmp_path, one_thread):
    """Through mmengine's loader, with the backbone under ``backbone.``
    and the checkpoint written by strip_frozen_backbone (what
    TrainableCheckpointHook saves)."""
    from mmengine.runner import load_checkpoint
    vit_file = save_vit(tmp_path / 'vit.pth', ARCH, 32, 8, seed=1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = prompted(vit_file)
            self.head = torch.nn.Conv2d(32, 2, 1)

    torch.manual_seed(0)
    trained = Model()
    trained.backbone.init_weights()
    ckpt = dict(state_dict=trained.state_dict(), meta={})
    strip_frozen_backbone(trained, ckpt)
    assert not any(k.startswith('backbone.blocks') for k in ckpt['state_dict'])
    torch.save(ckpt, tmp_path / 'small.pth')
    torch.manual_seed(5)
    model = Model()
    load_checkpoint(model, str(tmp_path / 'small.pth'), strict=True)
    x = torch.rand(1, 3, 32, 32)
    expected = trained.eval().head(trained.backbone(x)[0])
    torch.testing.assert_close(model.eval().head(model.backbone(x)[0]),
                               expected, rtol=0, atol=0)
    # inside a wrapper (keys under 'module.backbone.'), torch's own load
    torch.manual_seed(6)
    wrapped = torch.nn.DataParallel(Model())
    wrapped.load_state_dict({'module.' + k: v for k, v in
                             ckpt['state_dict'].items()}, strict=True)
    inner = wrapped.module.eval()
    torch.testing.assert_close(inner.head(inner.backbone(x)[0]), expected,
                               rtol=0, atol=0)


# ------------------------------------------ mmdet's and mmseg's loaders
def tiny_checkpoints(tmp_path, family):
    """The tiny config of ``family`` with a generated pretrained backbone,
    and two checkpoints of one model: trainable-only (as
    TrainableCheckpointHook writes it) and merged by
    tools/merge_checkpoint.py."""
    from mmengine.registry import MODELS, init_default_scope
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    try:
        import merge_checkpoint
    finally:
        sys.path.pop(0)
    cfg = Config.fromfile(osp.join(TINY, f'{family}_bpt_tiny.py'))
    backbone = cfg.model.backbone
    vit_file = save_vit(tmp_path / 'vit.pth', backbone.arch,
                        backbone.img_size, backbone.patch_size, seed=3)
    backbone.init_cfg = dict(type='Pretrained', checkpoint=vit_file)
    backbone.prompt.allow_identity_whitening = True
    # Prompts used as they are (B not whitened): a whitening hook would
    # refuse to overwrite the checkpoint's B (see test_nothing_lost.py).
    cfg.custom_hooks = [h for h in cfg.custom_hooks
                        if h['type'] != 'BPTWhiteningHook']
    config = str(tmp_path / f'{family}.py')
    cfg.dump(config)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    meta = dict(dataset_meta=dict(
        classes=cfg.train_dataloader.dataset.get('metainfo', {}).get(
            'classes', tuple(f'c{i}' for i in range(150)))))
    ckpt = dict(state_dict=model.state_dict(), meta=meta)
    strip_frozen_backbone(model, ckpt)
    small = str(tmp_path / 'small.pth')
    torch.save(ckpt, small)
    full = str(tmp_path / 'full.pth')
    merge_checkpoint.main([config, small, full])
    return dict(config=config, small=small, full=full, vit=vit_file)


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    import cv2
    path = str(tmp_path_factory.mktemp('img') / 'img.png')
    rng = np.random.default_rng(0)
    img = (rng.random((128, 160, 3)) * 255).astype(np.uint8)
    img[32:96, 40:120] = (220, 40, 40)  # a block for something to find
    cv2.imwrite(path, img)
    return path


def hide(path):
    """Move the pretrained file away; returns a function that puts it
    back."""
    os.rename(path, path + '.away')
    return lambda: os.rename(path + '.away', path)


def test_mmdet_init_detector_and_det_inferencer(tmp_path, image,
                                                one_thread):
    from mmdet.apis import DetInferencer, inference_detector, init_detector
    files = tiny_checkpoints(tmp_path, 'mask_rcnn')

    def init_detector_boxes(ckpt):
        # init_detector clears init_cfg: the recorded file serves
        model = init_detector(files['config'], ckpt, device='cpu')
        pred = inference_detector(model, image).pred_instances
        return pred.bboxes, pred.scores

    def inferencer_boxes(ckpt):
        inferencer = DetInferencer(model=files['config'], weights=ckpt,
                                   device='cpu', show_progress=False)
        out = inferencer(image, return_datasamples=True, no_save_vis=True)
        pred = out['predictions'][0].pred_instances
        return pred.bboxes, pred.scores

    for predict in (init_detector_boxes, inferencer_boxes):
        boxes, scores = predict(files['small'])
        assert len(scores) > 0, predict.__name__
        full_boxes, full_scores = predict(files['full'])
        torch.testing.assert_close(boxes, full_boxes, rtol=0, atol=0)
        torch.testing.assert_close(scores, full_scores, rtol=0, atol=0)
    put_back = hide(files['vit'])
    try:
        for predict in (init_detector_boxes, inferencer_boxes):
            with pytest.raises(CheckpointError, match='merge_checkpoint'):
                predict(files['small'])
        predict(files['full'])  # a full checkpoint needs no file
    finally:
        put_back()


def test_mmseg_init_model_and_mmseg_inferencer(tmp_path, image, one_thread):
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    files = tiny_checkpoints(tmp_path, 'upernet')

    def init_model_logits(ckpt):
        model = init_model(files['config'], ckpt, device='cpu')
        return inference_model(model, image).seg_logits.data

    def inferencer_logits(ckpt):
        inferencer = MMSegInferencer(model=files['config'], weights=ckpt,
                                     device='cpu')
        out = inferencer(image, return_datasamples=True)
        return out.seg_logits.data

    for predict in (init_model_logits, inferencer_logits):
        logits = predict(files['small'])
        torch.testing.assert_close(logits, predict(files['full']),
                                   rtol=0, atol=0)
    put_back = hide(files['vit'])
    try:
        for predict in (init_model_logits, inferencer_logits):
            with pytest.raises(CheckpointError, match='merge_checkpoint'):
                predict(files['small'])
    finally:
        put_back()


def test_mmdet_own_test_tool(tmp_path, tiny_workspace):
    """mmdet's tools/test.py, with a config that has no
    TrainableCheckpointHook: the same dumped predictions from the
    trainable-only and the merged checkpoint; refused without the
    pretrained file."""
    import mmdet
    mmdet_test = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools',
                          'test.py')
    assert osp.isfile(mmdet_test), mmdet_test
    files = tiny_checkpoints(tmp_path, 'mask_rcnn')
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get(
                   'PYTHONPATH', '')]))

    def test(ckpt, name, expect=0):
        out = subprocess.run(
            [sys.executable, mmdet_test, files['config'], ckpt, '--work-dir',
             str(tmp_path / name), '--out', str(tmp_path / f'{name}.pkl')],
            cwd=str(tiny_workspace), env=env, capture_output=True, text=True)
        text = out.stdout + out.stderr
        assert out.returncode == expect, text[-3000:]
        return text

    test(files['small'], 'small')
    test(files['full'], 'full')
    with open(tmp_path / 'small.pkl', 'rb') as f:
        small = pickle.load(f)
    with open(tmp_path / 'full.pkl', 'rb') as f:
        full = pickle.load(f)
    assert len(small) == len(full) == 8  # the generated validation images
    assert sum(len(p['pred_instances']['scores']) for p in small) > 0
    for a, b in zip(small, full):
        for key in ('bboxes', 'scores', 'labels'):
            torch.testing.assert_close(a['pred_instances'][key],
                                       b['pred_instances'][key],
                                       rtol=0, atol=0)
    put_back = hide(files['vit'])
    try:
        text = test(files['small'], 'refused', expect=1)
        assert 'merge_checkpoint.py' in text and files['vit'] in text
    finally:
        put_back()
