"""Trainable-only checkpoints and the weights-only loader of training state.

Small PromptedViT models in plain torch; the end-to-end use through
tools/train.py, tools/test.py and tools/merge_checkpoint.py is in
tests/test_tools.py.
"""
import copy
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import CheckpointLoader

import bpt_mm  # noqa: F401  installs the checkpoint loader
from bpt_mm.engine.checkpoint_io import (load_local_checkpoint,
                                         save_plain_checkpoint)
from bpt_mm.models.checkpoint import CheckpointError
from bpt_mm.engine.trainable_state import (backbone_fingerprint,
                                           check_can_strip,
                                           is_trainable_only,
                                           restore_frozen_backbone,
                                           strip_frozen_backbone,
                                           trainable_state_sizes)
from helpers import small_vit

torch.set_num_threads(1)
ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, mlp_ratio=1.0)


class Detector(nn.Module):
    """The shape of an mmdet/mmseg model: backbone, neck, head."""

    def __init__(self, pretrained=None, frozen=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        init_cfg = dict(type='Pretrained', checkpoint=pretrained) \
            if pretrained else None
        self.backbone = small_vit(
            arch=ARCH, frozen=frozen, init_cfg=init_cfg,
            prompt=dict(type='WhitenedPrompt', num_tokens=3, tunable=True,
                        allow_identity_whitening=True) if frozen else None)
        self.neck = nn.Conv2d(32, 8, 1)
        self.head = nn.Linear(8, 2)


def save_backbone(path, seed):
    torch.manual_seed(seed)
    vit = small_vit(arch=ARCH)
    torch.save({'model': vit.state_dict()}, path)  # MAE's container
    return path


@pytest.fixture
def pretrained(tmp_path):
    return str(save_backbone(tmp_path / 'vit.pth', seed=1))


def copy_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_checkpoint(pretrained):
    """A model with its pretrained backbone loaded and 'trained' heads."""
    model = Detector(pretrained)
    model.backbone.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    ckpt = dict(meta=dict(iter=3), state_dict=copy_state(model))
    return model, ckpt


# ------------------------------------------------------------- strip/restore
def test_strip_keeps_exactly_prompts_whitening_neck_and_heads(pretrained):
    model, ckpt = trained_checkpoint(pretrained)
    full = dict(ckpt['state_dict'])
    info = strip_frozen_backbone(model, ckpt)
    kept = set(ckpt['state_dict'])
    assert kept == {k for k in full if not k.startswith('backbone.')
                    or k.startswith('backbone.prompts.')
                    or k == 'backbone._extra_state'}  # the record
    assert 'backbone.prompts.0.whitening' in kept
    assert 'backbone.prompts.0.whitening_ready' in kept  # a buffer
    assert info['removed'] == len(full) - len(kept)
    assert info['bytes_after'] < info['bytes_before']
    assert (info['bytes_before'], info['bytes_after']) == \
        trainable_state_sizes(model)
    assert is_trainable_only(ckpt)
    record = ckpt['meta']['bpt_mm']
    assert record['backbone_checkpoint'] == pretrained
    assert record['backbone_fingerprint'] == backbone_fingerprint(
        model.backbone)


def test_restore_on_a_fresh_model_loads_the_pretrained_backbone(pretrained):
    model, ckpt = trained_checkpoint(pretrained)
    expected = copy_state(model)
    strip_frozen_backbone(model, ckpt)
    fresh = Detector(pretrained, seed=7)  # as Runner.test builds it
    assert not fresh.backbone.pretrained_loaded
    filled = restore_frozen_backbone(fresh, ckpt)
    assert fresh.backbone.pretrained_loaded
    assert len(filled) == len(expected) - len(
        [k for k in expected if not k.startswith('backbone.')
         or k.startswith('backbone.prompts.')
         or k == 'backbone._extra_state'])
    fresh.load_state_dict(ckpt['state_dict'], strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_restore_leaves_a_full_checkpoint_alone(pretrained):
    model, ckpt = trained_checkpoint(pretrained)
    fresh = Detector(None)
    assert restore_frozen_backbone(fresh, ckpt) == []
    assert not fresh.backbone.pretrained_loaded


def test_restore_without_a_pretrained_file_is_refused(pretrained):
    model, ckpt = trained_checkpoint(pretrained)
    strip_frozen_backbone(model, ckpt)
    # without init_cfg: the file the checkpoint records, fingerprint checked
    fresh = Detector(None)
    restore_frozen_backbone(fresh, copy.deepcopy(ckpt))
    assert fresh.backbone.pretrained_loaded
    # and with that file gone: refused, naming it and the way out
    os.rename(pretrained, pretrained + '.moved')
    with pytest.raises(CheckpointError, match='merge_checkpoint') as err:
        restore_frozen_backbone(Detector(None), ckpt)
    assert pretrained in str(err.value)  # says which file it was


def test_restore_with_another_backbone_is_refused(pretrained, tmp_path):
    model, ckpt = trained_checkpoint(pretrained)
    strip_frozen_backbone(model, ckpt)
    other = str(save_backbone(tmp_path / 'other.pth', seed=2))
    with pytest.raises(CheckpointError, match='is not the one this '
                       'checkpoint was trained on'):
        restore_frozen_backbone(Detector(other), ckpt)


def test_missing_trainable_backbone_weights_are_refused(pretrained):
    # Full fine-tuning: the backbone trains, so the file cannot stand in.
    model = Detector(pretrained, frozen=False)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith('backbone.blocks.1.')}
    fresh = Detector(pretrained, frozen=False)
    with pytest.raises(CheckpointError, match='train in this model'):
        restore_frozen_backbone(fresh, dict(state_dict=state))
    assert not fresh.backbone.pretrained_loaded  # refused before loading


def test_check_can_strip_refusals(pretrained):
    with pytest.raises(ValueError, match=r'init_cfg=dict\(type=.Pretrained'):
        check_can_strip(Detector(None))
    with pytest.raises(ValueError, match='frozen=True'):
        check_can_strip(Detector(pretrained, frozen=False))
    with pytest.raises(ValueError, match='PromptedViT'):
        check_can_strip(nn.Linear(2, 2))


def test_fingerprint_sees_a_single_changed_value(pretrained):
    model = Detector(pretrained)
    model.backbone.init_weights()
    before = backbone_fingerprint(model.backbone)
    with torch.no_grad():  # prompts train: they are not in the fingerprint
        model.backbone.prompts['0'].tokens.add_(1.0)
    assert backbone_fingerprint(model.backbone) == before
    with torch.no_grad():
        model.backbone.blocks[1].mlp.fc2.bias[3] += 1e-3
    assert backbone_fingerprint(model.backbone) != before


# ------------------------------------------------------------ checkpoint io
def mmengine_like_checkpoint(path):
    hub = MessageHub.get_instance('bpt_mm_test_hub')
    hub.update_scalar('train/loss', 1.5)
    hub.update_scalar('train/loss', np.float64(0.5))
    checkpoint = dict(meta=dict(iter=3, seed=np.int64(0)),
                      state_dict={'w': torch.ones(2)},
                      message_hub=hub.state_dict(),
                      random_state=dict(numpy=np.random.get_state()))
    # What a Runner saves with bpt_mm imported: the plain form.
    save_plain_checkpoint(checkpoint, str(path))
    return path, checkpoint


def test_mmengine_training_state_loads_without_running_code(tmp_path):
    path, checkpoint = mmengine_like_checkpoint(tmp_path / 'iter_3.pth')
    path = str(path)
    torch.save(checkpoint, path + '.pickled')  # as mmengine alone writes
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path + '.pickled', weights_only=True)  # refused by torch
    torch.load(path, weights_only=True)  # bpt_mm's form: torch alone reads
    ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    buffer = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.mean() == pytest.approx(1.0)
    assert ckpt['random_state']['numpy'][0] == 'MT19937'


class _Boom:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'x': _Boom()}, path)
    with pytest.raises(CheckpointError, match=r'global posix\.system|'
                       r'global os\.system'):
        load_local_checkpoint(path)


class _Sneaky:
    """getattr on an allowed class that is not a HistoryBuffer."""

    def __reduce__(self):
        import collections
        return (getattr, (collections.OrderedDict, 'fromkeys'))


def test_getattr_is_refused(tmp_path):
    path = str(tmp_path / 'sneaky.pth')
    torch.save({'x': _Sneaky()}, path)
    with pytest.raises(CheckpointError, match=r'global builtins\.getattr'):
        load_local_checkpoint(path)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_local_checkpoint(str(tmp_path / 'nope.pth'))
