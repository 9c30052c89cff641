"""Checkpoints that hold only what trains, and their safe restoration.

With a frozen backbone, everything a run learns is the prompts (with their
whitening buffers), the neck and the heads: a few MB, against hundreds of MB
for the ViT itself. :func:`strip_frozen_backbone` removes the frozen backbone
from an mmengine checkpoint and records which backbone it was trained on (the
path in ``init_cfg`` and a SHA-256 of the frozen tensors).

Loading such a checkpoint is only correct on top of that same pretrained
backbone. mmengine loads checkpoints non-strictly and ``Runner.test()`` never
calls ``init_weights``, so a plain load would evaluate a random backbone with
nothing but missing-key warnings. :func:`restore_frozen_backbone` closes that
gap: it loads the backbone's pretrained weights when they are not in yet,
checks the fingerprint, and fills the checkpoint's state dict back to a full
one, or refuses with an error that says what is missing.
"""
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from bpt_mm.models.checkpoint import CheckpointError
from bpt_mm.models.frozen_state import (EXTRA_STATE_KEY, complete_frozen_state,
                                        frozen_extra_state)
from bpt_mm.models.vit import PromptedViT, find_prompted_backbone, unwrap_model

#: Key of bpt_mm's record in ``checkpoint['meta']``.
META_KEY = 'bpt_mm'


def backbone_prefix(model: nn.Module, backbone: PromptedViT) -> str:
    """Prefix of ``backbone``'s keys in ``model.state_dict()`` (``''`` when
    the model is the backbone)."""
    model = unwrap_model(model)
    for name, module in model.named_modules():
        if module is backbone:
            return f'{name}.' if name else ''
    raise ValueError(f'{type(backbone).__name__} is not a submodule of '
                     f'{type(model).__name__}')


def backbone_fingerprint(backbone: PromptedViT) -> str:
    """SHA-256 over the frozen backbone tensors, keys in state-dict order
    (:meth:`PromptedViT.frozen_fingerprint`).

    Two backbones have the same fingerprint exactly when every frozen
    tensor has the same name, shape, dtype and bytes.
    """
    return backbone.frozen_fingerprint()


def _require_prompted_backbone(model: nn.Module, what: str) -> PromptedViT:
    backbone = find_prompted_backbone(model)
    if backbone is None:
        raise ValueError(f'{what} needs a model whose `backbone` is a '
                         f'PromptedViT, got '
                         f'{type(unwrap_model(model)).__name__}')
    return backbone


def check_can_strip(model: nn.Module) -> PromptedViT:
    """Refuse, before training starts, a model whose trainable-only
    checkpoints could not be restored.

    Raises:
        ValueError: The backbone is not frozen (full fine-tuning trains it,
            so nothing can be left out) or has no pretrained checkpoint in
            ``init_cfg`` to restore the frozen weights from.
    """
    backbone = _require_prompted_backbone(model, 'a trainable-only checkpoint')
    if not backbone.frozen:
        raise ValueError(
            'trainable-only checkpoints need `model.backbone.frozen=True`; '
            'with frozen=False the backbone trains and must be saved whole')
    if backbone.pretrained_checkpoint is None:
        raise ValueError(
            'trainable-only checkpoints need the frozen backbone to come from '
            "a file: set `model.backbone.init_cfg=dict(type='Pretrained', "
            "checkpoint=PATH)`; a randomly initialised backbone could not be "
            'restored when the checkpoint is loaded')
    return backbone


def strip_frozen_backbone(model: nn.Module,
                          checkpoint: Dict[str, Any],
                          fingerprint: Optional[str] = None) -> Dict[str, int]:
    """Remove the frozen backbone from ``checkpoint['state_dict']`` in place.

    Args:
        model (nn.Module): The model the checkpoint was taken from.
        checkpoint (dict): An mmengine checkpoint (``state_dict``, ``meta``).
        fingerprint (str, optional): :func:`backbone_fingerprint` of the
            backbone, if already computed (it never changes while frozen).

    Returns:
        dict: ``removed`` keys and ``bytes_before``/``bytes_after`` of the
        state dict's tensors.

    Raises:
        ValueError: As :func:`check_can_strip`.
    """
    backbone = check_can_strip(model)
    prefix = backbone_prefix(model, backbone)
    state = checkpoint['state_dict']
    before = _tensor_bytes(state)
    removed = 0
    for key in backbone.frozen_state_keys():
        if state.pop(prefix + key, None) is not None:
            removed += 1
    fingerprint = fingerprint or backbone_fingerprint(backbone)
    # The record the module itself checks on any load (see
    # bpt_mm.models.frozen_state); meta below is for the runner's hook.
    state[prefix + EXTRA_STATE_KEY] = frozen_extra_state(
        backbone.pretrained_checkpoint, fingerprint)
    meta = checkpoint.setdefault('meta', {})
    meta[META_KEY] = dict(
        trainable_only=True,
        backbone_prefix=prefix,
        backbone_checkpoint=os.fspath(backbone.pretrained_checkpoint),
        backbone_fingerprint=fingerprint,
        removed_keys=removed)
    return dict(removed=removed, bytes_before=before,
                bytes_after=_tensor_bytes(state))


def _tensor_bytes(state: Dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values()
               if isinstance(v, torch.Tensor))


def checkpoint_record(checkpoint: Dict[str, Any],
                      source: Optional[str] = None) -> Dict[str, Any]:
    """``checkpoint['meta']['bpt_mm']`` (what :func:`strip_frozen_backbone`
    recorded), or ``{}`` when the checkpoint has none.

    The file is not trusted to hold the types bpt_mm writes: a ``meta``
    that is not a dict, a record that is not a dict, or a fingerprint or
    file name that is not a string would otherwise end in an
    ``AttributeError`` or a wrong comparison deep in the loading.

    Raises:
        CheckpointError: Naming the file and the key.
    """
    where = f'checkpoint {source!r}' if source else 'the checkpoint'
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: ['meta'] must be a dict, got a "
                              f'{type(meta).__name__}')
    record = meta.get(META_KEY)
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: ['meta'][{META_KEY!r}] must be a "
                              f'dict, got a {type(record).__name__}')
    for key in ('backbone_fingerprint', 'backbone_checkpoint',
                'backbone_prefix'):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise CheckpointError(
                f"{where}: ['meta'][{META_KEY!r}][{key!r}] must be a str, "
                f'got a {type(record[key]).__name__}')
    return record


def is_trainable_only(checkpoint: Dict[str, Any],
                      source: Optional[str] = None) -> bool:
    """Whether ``checkpoint`` (read from ``source``, named in messages) was
    written by :func:`strip_frozen_backbone`.

    Raises:
        CheckpointError: A malformed ``meta`` (:func:`checkpoint_record`).
    """
    return bool(checkpoint_record(checkpoint, source).get('trainable_only'))


def check_backbone_shapes(model: nn.Module, checkpoint: Dict[str, Any],
                          source: Optional[str] = None) -> None:
    """Refuse a checkpoint made for another backbone architecture.

    mmengine loads checkpoints non-strictly: a tensor whose shape differs
    from the model's is skipped with a warning, and blocks the model does
    not have are ignored, so a checkpoint of another ViT would be run with
    the skipped weights left at their (random) initialisation.

    Raises:
        CheckpointError: A backbone tensor of the checkpoint has another
            shape than the model's, or the checkpoint has blocks the model
            lacks; the message names the key, both shapes and ``source``.
    """
    backbone = find_prompted_backbone(model)
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) \
        else None
    if backbone is None or not isinstance(state, dict):
        return
    prefix = backbone_prefix(model, backbone)
    where = f' {source!r}' if source else ''
    own = backbone.state_dict()
    for key, value in state.items():
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
            continue
        name = key[len(prefix):]
        if name == EXTRA_STATE_KEY:
            continue  # the record, not a weight (its length varies)
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            raise CheckpointError(
                f'checkpoint{where} is for another backbone: {key!r} has '
                f'shape {tuple(value.shape)}, the model expects '
                f'{tuple(own[name].shape)} (embed_dims '
                f'{backbone.embed_dims}, {backbone.num_layers} blocks, patch '
                f'size {backbone.patch_size})')
        parts = name.split('.')
        if parts[0] == 'blocks' and len(parts) > 1 and parts[1].isdigit() \
                and int(parts[1]) >= backbone.num_layers:
            raise CheckpointError(
                f'checkpoint{where} is for another backbone: it has {key!r}, '
                f'the model has {backbone.num_layers} blocks')


def restore_frozen_backbone(model: nn.Module, checkpoint: Dict[str, Any],
                            logger: Any = None,
                            source: Optional[str] = None) -> List[str]:
    """Make ``checkpoint`` whole again before it is loaded into ``model``.

    A trainable-only checkpoint (no frozen backbone key, a record of the
    backbone it was trained on) is completed by the module's own rule,
    :func:`bpt_mm.models.frozen_state.complete_frozen_state`. When only
    some frozen keys are missing, the backbone's pretrained weights are
    loaded from ``init_cfg`` unless they are in already (as in training,
    after ``init_weights``) and copied into ``checkpoint['state_dict']``.
    A full checkpoint is left as it is.

    Args:
        model (nn.Module): The model about to receive the checkpoint.
        checkpoint (dict): The loaded checkpoint (modified in place).
        logger (optional): Gets one ``info`` line when the backbone is
            restored.
        source (str, optional): Where the checkpoint came from, for
            messages.

    Returns:
        list[str]: The keys filled in from the pretrained backbone.

    Raises:
        CheckpointError: The checkpoint is for another backbone
            architecture (:func:`check_backbone_shapes`). Backbone keys are
            missing and ``init_cfg`` names no
            pretrained checkpoint, or the pretrained backbone's fingerprint
            differs from the one the checkpoint was trained on.
    """
    backbone = find_prompted_backbone(model)
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) \
        else None
    if backbone is None or not isinstance(state, dict):
        return []
    check_backbone_shapes(model, checkpoint, source)
    prefix = backbone_prefix(model, backbone)
    record = checkpoint_record(checkpoint, source)
    # The keys the model's backbone has and the checkpoint lacks, frozen or
    # not: a fine-tuned backbone missing from a checkpoint is as bad.
    own = list(backbone.state_dict())
    missing = [k for k in own if not k.startswith('prompts.')
               and k != EXTRA_STATE_KEY and prefix + k not in state]
    if not missing:
        return []
    # Checked before anything is loaded: weights that train cannot come
    # from the pretrained file.
    trained = sorted(set(missing) - set(backbone.frozen_state_keys()))
    if trained:
        raise CheckpointError(
            f'the checkpoint lacks backbone weights that train in this model '
            f'(e.g. {prefix + trained[0]!r}); they cannot come from the '
            f'pretrained file')
    frozen = backbone.frozen_state_keys()
    if len(missing) == len(frozen) and (
            record or prefix + EXTRA_STATE_KEY in state):
        # A trainable-only checkpoint: the module's own rule (which also
        # serves loads without this hook). Checkpoints written before the
        # module kept the record as extra state have it in meta only.
        state.setdefault(prefix + EXTRA_STATE_KEY, frozen_extra_state(
            record.get('backbone_checkpoint'),
            record.get('backbone_fingerprint')))
        filled = complete_frozen_state(backbone, state, prefix)
        if logger is not None:
            logger.info(f'restored {len(filled)} frozen backbone tensors '
                        f'from {backbone._pretrained_source!r} into the '
                        f'checkpoint (trainable-only: True)')
        return filled
    if not backbone.pretrained_loaded:
        if backbone.pretrained_checkpoint is None:
            raise CheckpointError(
                f'the checkpoint has no weights for {len(missing)} backbone '
                f'keys, e.g. {prefix + missing[0]!r}, and '
                f'`model.backbone.init_cfg` names no pretrained checkpoint '
                f"to take them from. Set init_cfg=dict(type='Pretrained', "
                f'checkpoint=PATH) to the backbone it was trained on, or '
                f'load a full checkpoint (tools/merge_checkpoint.py makes '
                f'one)')
        backbone.init_weights()
    backbone_state = backbone.state_dict()
    for key in missing:
        state[prefix + key] = backbone_state[key].detach().clone()
    if logger is not None:
        logger.info(f'restored {len(missing)} frozen backbone tensors from '
                    f'{backbone.pretrained_checkpoint!r} into the checkpoint '
                    f'(trainable-only: False)')
    return [prefix + k for k in missing]


def trainable_state_sizes(model: nn.Module) -> Tuple[int, int]:
    """Bytes of the full state dict and of its trainable-only part."""
    backbone = _require_prompted_backbone(model, 'trainable_state_sizes')
    prefix = backbone_prefix(model, backbone)
    state = unwrap_model(model).state_dict()
    frozen = {prefix + k for k in backbone.frozen_state_keys()}
    full = _tensor_bytes(state)
    return full, full - _tensor_bytes(
        {k: v for k, v in state.items() if k in frozen})
