"""The frozen backbone's identity, kept in the model's own state.

A frozen :class:`~bpt_mm.models.vit.PromptedViT` saves, next to its
tensors, an *extra state* entry (``<prefix>_extra_state``, torch's
``get_extra_state``/``set_extra_state``) that says which pretrained file
its frozen weights came from and their SHA-256 (:func:`frozen_fingerprint`).
When a state dict that has none of the frozen weights is loaded into the
module (a trainable-only checkpoint, whoever loads it: mmengine's runner,
``init_detector``, ``DetInferencer``, mmseg's ``init_model``, a plain
``load_state_dict``), :func:`complete_frozen_state` fills them in from the
pretrained file the module's ``init_cfg`` names, after checking the
fingerprint, or refuses naming the file and the way out. Because the check
sits in the module's ``_load_from_state_dict``, it holds for strict and
non-strict loads, inside DDP wrappers and without any hook.
"""
import hashlib
import json
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .checkpoint import CheckpointError

#: torch's key suffix for a module's extra state in a state dict.
EXTRA_STATE_KEY = torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX

#: What :func:`frozen_extra_state` writes, and all it may hold.
EXTRA_STATE_FIELDS = ('pretrained_checkpoint', 'frozen_sha256')


def frozen_fingerprint(backbone: nn.Module, keys: List[str]) -> str:
    """SHA-256 over the tensors ``keys`` of ``backbone.state_dict()``, in
    that order.

    Two backbones have the same fingerprint exactly when every frozen
    tensor has the same name, shape, dtype and bytes.
    """
    digest = hashlib.sha256()
    state = backbone.state_dict()
    for key in keys:
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f'{key}:{tuple(tensor.shape)}:{tensor.dtype};'.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_extra_state(pretrained_checkpoint: Optional[str],
                       fingerprint: Optional[str]) -> torch.Tensor:
    """The extra-state record, as a uint8 tensor of JSON text.

    A tensor, not a dict: mmengine's runner broadcasts every state-dict
    entry between processes, and much code clones or compares them; a
    weights-only load reads it like any tensor.
    """
    record = dict(pretrained_checkpoint=None if pretrained_checkpoint is None
                  else str(pretrained_checkpoint),
                  frozen_sha256=fingerprint)
    data = json.dumps(record, sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def parse_extra_state(state: Any, where: str) -> Dict[str, Optional[str]]:
    """Read an extra-state record (:func:`frozen_extra_state`) from a
    checkpoint; None means no record.

    Raises:
        CheckpointError: ``state`` is not such a record.
    """
    if state is None:
        return dict.fromkeys(EXTRA_STATE_FIELDS)
    record = None
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 \
            and state.dim() == 1:
        try:
            record = json.loads(bytes(state.tolist()).decode())
        except ValueError:
            record = None
    if not isinstance(record, dict) or set(record) - set(EXTRA_STATE_FIELDS) \
            or any(v is not None and not isinstance(v, str)
                   for v in record.values()):
        raise CheckpointError(
            f'{where!r} must be bpt_mm\'s record of the frozen backbone (a '
            f'uint8 tensor of JSON with keys {list(EXTRA_STATE_FIELDS)}), '
            f'got {str(state)[:200]}')
    return {k: record.get(k) for k in EXTRA_STATE_FIELDS}


def complete_frozen_state(backbone: nn.Module, state_dict: Dict[str, Any],
                          prefix: str) -> List[str]:
    """Fill a state dict that lacks every frozen backbone tensor.

    Called by ``PromptedViT._load_from_state_dict`` before the tensors are
    copied, on the very dict the load reads from (torch and mmengine pass a
    copy of the caller's dict, so the caller's dict is not changed).

    The frozen tensors come from the backbone itself when it holds the ones
    the state dict was trained on (its fingerprint equals the recorded
    one, or its pretrained file was loaded), otherwise from the pretrained
    file its ``init_cfg`` names or, without one, from the file the state
    dict records (mmdet's ``init_detector`` and mmseg's ``init_model``
    clear ``init_cfg``), which is loaded now and checked against the
    recorded fingerprint.

    Args:
        backbone (PromptedViT): The module receiving ``state_dict``.
        state_dict (dict): The state dict of the load (modified in place).
        prefix (str): The backbone's key prefix in ``state_dict``, e.g.
            ``'backbone.'``.

    Returns:
        list[str]: The keys filled in (``[]`` when the state dict has
        frozen tensors, or the backbone is not frozen).

    Raises:
        CheckpointError: The backbone has no pretrained weights to take
            them from (no ``init_cfg`` checkpoint, and its own weights are
            not the recorded ones), or the pretrained file is not the
            backbone the state dict was trained on.
    """
    keys = backbone.frozen_state_keys()
    if not keys or any(prefix + k in state_dict for k in keys):
        return []
    record = parse_extra_state(state_dict.get(prefix + EXTRA_STATE_KEY),
                               prefix + EXTRA_STATE_KEY)
    expected = record['frozen_sha256']
    trained_on = record['pretrained_checkpoint']
    actual = backbone.frozen_fingerprint() if expected is not None else None
    holds_them = backbone.pretrained_loaded or (
        expected is not None and actual == expected)
    if not holds_them:
        # init_cfg's file; else the recorded one, which mmdet's
        # init_detector and mmseg's init_model need (they clear init_cfg):
        # the fingerprint check below makes either safe.
        source = backbone.pretrained_checkpoint or trained_on
        if source is None or (source == trained_on and expected is None):
            raise CheckpointError(
                f'the checkpoint has none of the {len(keys)} frozen backbone '
                f'weights (e.g. {prefix + keys[0]!r}): it is a trainable-only '
                f'checkpoint, and neither it nor `model.backbone.init_cfg` '
                f'names a pretrained file to take them from, so the backbone '
                f"would run with random weights. Set model.backbone.init_cfg="
                f"dict(type='Pretrained', checkpoint=PATH) to the backbone it "
                f'was trained on, or make a full checkpoint with '
                f'`python tools/merge_checkpoint.py CONFIG CHECKPOINT OUT` '
                f'and load that')
        try:
            backbone.load_pretrained_file(source)
        except (FileNotFoundError, CheckpointError) as exc:
            where = ('`model.backbone.init_cfg` names'
                     if source == backbone.pretrained_checkpoint
                     else 'the checkpoint records')
            raise CheckpointError(
                f'the checkpoint has none of the {len(keys)} frozen backbone '
                f'weights (a trainable-only checkpoint), and the pretrained '
                f'file {where}, {source!r}, cannot be read ({exc}). Point '
                f"model.backbone.init_cfg=dict(type='Pretrained', "
                f'checkpoint=PATH) at that backbone, or make a full '
                f'checkpoint with `python tools/merge_checkpoint.py CONFIG '
                f'CHECKPOINT OUT` and load that') from exc
        if expected is not None:
            actual = backbone.frozen_fingerprint()
    if expected is not None and actual != expected:
        raise CheckpointError(
            f'the pretrained backbone {backbone._pretrained_source!r} '
            f'is not the one this checkpoint was trained on (recorded: '
            f'{trained_on!r}): the SHA-256 of its frozen weights is '
            f'{actual[:12]}..., the checkpoint expects {expected[:12]}...'
            f'; point model.backbone.init_cfg.checkpoint at that file')
    own = backbone.state_dict()
    for key in keys:
        state_dict[prefix + key] = own[key]
    return [prefix + k for k in keys]
