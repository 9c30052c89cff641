"""Checkpoints a run starts from: the resume marker and the latest
checkpoint, and the checks that a `--resume`, `load_from` or test checkpoint
fits the model.
"""
import os
import os.path as osp
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config

from bpt_mm.models.checkpoint_source import is_local_path

_CKPT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` (without a path) continues from.

    mmengine's ``last_checkpoint`` marker when it names an existing file
    (or a name of a file backend, as a ``CheckpointHook`` with
    ``out_dir='s3://...'`` writes: as mmengine's own auto-resume, that
    backend reports a missing file when the checkpoint is read).
    The marker is rewritten in place after each save, so a job killed at
    that moment can leave it empty; then (or when it names a file that is
    gone) the newest ``iter_N.pth``/``epoch_N.pth`` of ``work_dir`` is used
    and a warning says so. Checkpoints themselves are written atomically
    (see :class:`bpt_mm.engine.checkpoint_io.AtomicLocalBackend`), so every
    such file is complete.

    Returns:
        str | None: The path, or None when the work dir has no marker (a
        run that never saved).

    Raises:
        FileNotFoundError: The marker is unusable and no checkpoint file is
            left to fall back on.
    """
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        return None
    with open(marker) as f:
        named = f.read().strip()
    # A CheckpointHook `out_dir` of a file backend (s3://...) names its
    # checkpoints there; that backend says whether one is missing.
    if named and (not is_local_path(named) or osp.isfile(named)):
        return named
    found = []
    for name in os.listdir(work_dir):
        match = _CKPT_NAME.match(name)
        if match and osp.isfile(osp.join(work_dir, name)):
            found.append((match.group(1) == 'iter', int(match.group(2)),
                          osp.join(work_dir, name)))
    what = f'names {named!r}, which does not exist' if named else 'is empty'
    if not found:
        raise FileNotFoundError(
            f'--resume: {marker!r} {what}, and {work_dir!r} holds no '
            f'iter_N.pth or epoch_N.pth checkpoint to resume from')
    newest = max(found)[2]
    warnings.warn(f'--resume: {marker!r} {what}; resuming from the newest '
                  f'checkpoint in the work dir, {newest!r}')
    return newest


def resolve_auto_resume(cfg: Config) -> str:
    """Set ``cfg.resume``/``cfg.load_from`` for ``--resume`` without a
    path; returns a line saying what the run will start from.

    With a checkpoint in the work dir (:func:`latest_checkpoint`), the run
    resumes from it. Without one, the config's own ``load_from`` (e.g.
    weights of a detector trained on COCO) is kept as the start, as a
    plain weights load: mmdet's ``--resume`` sets ``load_from = None`` and
    the first start of a preemptible job then silently trains without
    those weights.
    """
    latest = latest_checkpoint(cfg.work_dir)
    if latest is not None:
        cfg.resume, cfg.load_from = True, latest
        return f'--resume: resuming from {latest!r}'
    configured = cfg.get('load_from')
    cfg.resume = False
    if configured:
        return (f'--resume: no checkpoint in {cfg.work_dir!r} yet (no '
                f'last_checkpoint file); training starts from iteration 0 '
                f'with the config\'s load_from={configured!r}')
    return (f'--resume: no checkpoint in {cfg.work_dir!r} yet (no '
            f'last_checkpoint file); training starts from iteration 0')


def _read_checkpoint(path: str) -> Any:
    """The object in ``path``, read as mmengine reads checkpoints (through
    bpt_mm's loader for local files), on the CPU."""
    from mmengine.runner.checkpoint import _load_checkpoint
    return _load_checkpoint(path, map_location='cpu')


def _model_state_of(checkpoint: Any) -> Dict[str, Any]:
    """The model weights of a checkpoint: ``state_dict`` (mmengine), else
    the dict itself, without a DDP ``module.`` prefix."""
    state = checkpoint.get('state_dict', checkpoint) \
        if isinstance(checkpoint, dict) else {}
    if not isinstance(state, dict):
        return {}
    return {(k[len('module.'):] if k.startswith('module.') else k): v
            for k, v in state.items()}


def _what_the_file_looks_like(checkpoint: Any) -> str:
    from bpt_mm.whitening.io import FILE_FORMAT
    if isinstance(checkpoint, dict) and checkpoint.get('format') == \
            FILE_FORMAT:
        return 'a whitening file (tools/compute_whitening.py)'
    if isinstance(checkpoint, dict) and checkpoint:
        return 'model weights without training state (pretrained weights?)'
    return f'a {type(checkpoint).__name__}, not a checkpoint dict'


def _trainable_shapes(model: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    from bpt_mm.models.vit import unwrap_model
    return {name: tuple(p.shape) for name, p in
            unwrap_model(model).named_parameters() if p.requires_grad}


def _shape_mismatches(model: torch.nn.Module,
                      state: Dict[str, Any]) -> List[str]:
    """``key: checkpoint S vs model S`` for each trainable weight whose
    shape differs from the checkpoint's."""
    return [f'{k}: checkpoint {tuple(state[k].shape)} vs model {shape}'
            for k, shape in _trainable_shapes(model).items()
            if k in state and hasattr(state[k], 'shape')
            and tuple(state[k].shape) != shape]


def _brief_keys(keys: Sequence[str], limit: int = 5) -> str:
    keys = list(keys)
    return ', '.join(keys[:limit]) + (
        f' and {len(keys) - limit} more' if len(keys) > limit else '')


def check_resume_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Refuse ``--resume PATH`` with a file training cannot continue from.

    mmengine's resume reads ``checkpoint['meta']`` (a ``KeyError: 'meta'``
    for pretrained weights or a whitening file), skips model tensors of
    another shape with a printed line, and then restores optimizer state
    for them, which fails inside the optimizer or trains the wrong
    tensors. Checked here, before training starts: the file is a training
    checkpoint (``meta`` with ``epoch`` and ``iter``, ``state_dict``), and
    every trainable weight of ``model`` is in it with its shape.

    Args:
        model (torch.nn.Module): The runner's model (built, not loaded).
        path (str): The checkpoint ``--resume`` names.

    Raises:
        ValueError: Naming the file and what it lacks, or the key and
            both shapes.
    """
    checkpoint = _read_checkpoint(path)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not (isinstance(meta, dict) and 'epoch' in meta and 'iter' in meta
            and isinstance(checkpoint.get('state_dict'), dict)):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else []
        raise ValueError(
            f'--resume: {path!r} is not a training checkpoint (no `meta` '
            f'with epoch and iter, or no `state_dict`; top-level keys '
            f'{keys}): it looks like {_what_the_file_looks_like(checkpoint)}'
            '. Resume from a checkpoint tools/train.py saved, or start a new '
            f'run from these weights with --cfg-options load_from={path}')
    for key in ('epoch', 'iter'):
        # mmengine sets the loop's counters from these as they are: a
        # string or a negative count fails (or loops) deep in training.
        value = meta[key]
        if type(value) is not int or value < 0:
            raise ValueError(
                f"--resume: {path!r}: ['meta'][{key!r}] must be a "
                f'non-negative int, got {value!r}; the file is damaged or '
                f'was not written by a Runner')
    state = _model_state_of(checkpoint)
    mismatched = _shape_mismatches(model, state)
    if mismatched:
        raise ValueError(
            f'--resume: {path!r} was trained with other shapes than this '
            f'config builds: {_brief_keys(mismatched, 3)}. Resume with the '
            f'config it was trained with (e.g. the same prompt type and '
            f'rank), or start a new run from it with load_from')
    missing = [k for k in _trainable_shapes(model) if k not in state]
    if missing:
        raise ValueError(
            f'--resume: {path!r} lacks {len(missing)} trainable weight(s) of '
            f'this config: {_brief_keys(missing)}; it was trained with '
            f'another config (prompt type, heads). Resume with that config '
            f'or start a new run from it with load_from')
    # mmengine's Runner.resume reads checkpoint['message_hub'] (KeyError or
    # an assertion without the file's name otherwise) and restores the
    # optimizer only when the key is there: without it the run would go on
    # with fresh optimizer moments, not the run that was saved.
    hub = checkpoint.get('message_hub')
    if not (isinstance(hub, dict) and all(
            isinstance(hub.get(k), dict)
            for k in ('log_scalars', 'runtime_info', 'resumed_keys'))):
        raise ValueError(
            f'--resume: {path!r} has no `message_hub` dict with '
            f'log_scalars, runtime_info and resumed_keys (got '
            f'{type(hub).__name__}); it was not saved by a Runner (e.g. '
            f'tools/merge_checkpoint.py output). Start a new run from it '
            f'with --cfg-options load_from={path}')
    if not isinstance(checkpoint.get('optimizer'), dict):
        raise ValueError(
            f'--resume: {path!r} holds no optimizer state (saved with '
            f'save_optimizer=False, or not by a Runner); resuming would '
            f'continue with a fresh optimizer, another run than the one '
            f'saved. Start a new run from it with --cfg-options '
            f'load_from={path}')


def check_load_from_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Refuse ``load_from`` (without ``--resume``) naming a file that holds
    none of the model's weights.

    mmengine loads ``load_from`` non-strictly: a whitening file or a
    backbone-only pretrained file (timm/MAE key names, no ``backbone.``
    prefix) matches no key, mmengine prints the key lists, and training
    starts from the initialisation with exit code 0, as if ``load_from``
    were not set. A partial match (e.g. heads of another class count) is
    mmengine's usual fine-tuning start and is left to it.

    Args:
        model (torch.nn.Module): The runner's model (built, not loaded).
        path (str): The file ``load_from`` names.

    Raises:
        ValueError: Naming the file, what it looks like and where it
            belongs instead.
    """
    from bpt_mm.models.vit import unwrap_model
    from bpt_mm.whitening.io import FILE_FORMAT
    checkpoint = _read_checkpoint(path)
    if isinstance(checkpoint, dict) and \
            checkpoint.get('format') == FILE_FORMAT:
        raise ValueError(
            f'load_from: {path!r} is a whitening file '
            f'(tools/compute_whitening.py), not model weights; mmengine '
            f'would load none of it and train from the initialisation. Give '
            f'it to the whitening hook instead: custom_hooks entry '
            f"dict(type='BPTWhiteningHook', whitening_file={path!r})")
    state = _model_state_of(checkpoint)
    names = list(unwrap_model(model).state_dict())
    if not any(name in state for name in names):
        raise ValueError(
            f'load_from: {path!r} holds none of the {len(names)} weights of '
            f'this model (its keys: {_brief_keys(sorted(map(str, state)))}'
            f'); it looks like '
            f'{_what_the_file_looks_like(checkpoint)}, and mmengine would '
            f'load nothing and train from the initialisation. Pretrained '
            f'backbone weights belong in model.backbone.init_cfg '
            f"(dict(type='Pretrained', checkpoint=...)); load_from takes a "
            f'checkpoint of this model')


def check_checkpoint_covers_model(model: torch.nn.Module, path: str) -> None:
    """Refuse to evaluate a checkpoint that does not hold the model's
    trained weights.

    mmengine's ``Runner.test`` loads non-strictly: a checkpoint of another
    config (a Mask R-CNN one under a Cascade config, other prompts) loads
    partly, with printed warnings, and the metrics come from random heads.
    Every trainable weight of ``model`` (prompts, neck, heads; the frozen
    backbone is completed by ``TrainableCheckpointHook``) must be in the
    checkpoint with its shape.

    Args:
        model (torch.nn.Module): The runner's model (built, not loaded).
        path (str): The checkpoint to test.

    Raises:
        ValueError: Naming the file and some missing keys, or a key and
            both shapes.
    """
    checkpoint = _read_checkpoint(path)
    state = _model_state_of(checkpoint)
    mismatched = _shape_mismatches(model, state)
    if mismatched:
        raise ValueError(
            f'checkpoint {path!r} does not fit this config: '
            f'{_brief_keys(mismatched, 3)}; test it with the config it was '
            f'trained with')
    trainable = _trainable_shapes(model)
    missing = [k for k in trainable if k not in state]
    if missing:
        origin = 'trained with another config?' if isinstance(
            checkpoint, dict) and 'state_dict' in checkpoint else \
            f'it looks like {_what_the_file_looks_like(checkpoint)}'
        raise ValueError(
            f'checkpoint {path!r} lacks {len(missing)} of the '
            f'{len(trainable)} trained weights of this config ({origin}): '
            f'{_brief_keys(missing)}; evaluating it would report metrics of '
            f'untrained weights. Test it with the config it was trained with')
