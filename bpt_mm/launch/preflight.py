"""Checks before a run starts, and the switches the tools set: data paths, the
whitening source and output, the non-finite check, test-time drawing.
"""
import os
import os.path as osp
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config

if TYPE_CHECKING:
    from bpt_mm.models.prompts import PromptOptions


def check_whitening_output(path: str, flag: str = '--out') -> None:
    """Refuse, before any work, an output path that cannot or must not be
    written: a directory, a path below a file, or an existing file that is
    not a whitening file of ``tools/compute_whitening.py`` (which may be
    replaced).

    Raises:
        ValueError: Naming ``flag`` and the path.
    """
    if osp.isdir(path):
        raise ValueError(f'{flag} {path!r} is a directory; give a file name '
                         f'such as {osp.join(path, "whitening.pth")!r}')
    parent = osp.dirname(osp.abspath(path))
    while not osp.lexists(parent):  # missing folders are made on saving
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        raise ValueError(f'{flag} {path!r}: {parent!r} is a file, not a '
                         f'folder')
    if osp.lexists(path):
        from bpt_mm.whitening.io import FILE_FORMAT
        try:
            existing = torch.load(path, map_location='cpu', weights_only=True)
        except Exception:  # noqa: BLE001 (anything else is not ours)
            existing = None
        if not (isinstance(existing, dict)
                and existing.get('format') == FILE_FORMAT):
            raise ValueError(
                f'{flag} {path!r} exists and is not a whitening file this '
                f'tool wrote; it is left as it is. Choose another path')


def set_finite_check(cfg: Config, enabled: bool = True) -> None:
    """Make sure training stops at a non-finite loss, unless told not to.

    Every config of ``configs/`` lists ``FiniteCheckHook``; a config of the
    user's own gets it here. ``enabled=False`` (``--allow-non-finite``) is
    the explicit way off: it removes the hook.

    Args:
        cfg (Config): The training config (``custom_hooks`` is edited).
        enabled (bool): Add the hook where missing (True) or remove it.
    """
    from bpt_mm.engine.finite_check_hook import FINITE_CHECK_HOOK_TYPES
    hooks = [h for h in (cfg.get('custom_hooks') or [])
             if not (isinstance(h, dict)
                     and h.get('type') in FINITE_CHECK_HOOK_TYPES)]
    present = len(hooks) != len(cfg.get('custom_hooks') or [])
    if enabled:
        if not present:
            hooks.append(dict(type='FiniteCheckHook'))
        else:
            return  # keep the config's own entry and its options
    cfg.custom_hooks = hooks


def enable_visualization(cfg: Config, show_dir: Optional[str] = None,
                         show: bool = False, wait_time: float = 2.0) -> None:
    """Draw test predictions (``--show``, ``--show-dir``, ``--wait-time``),
    as mmdet's and mmseg's ``tools/test.py`` do.

    mmdet's ``DetVisualizationHook`` saves the drawings under
    ``<work_dir>/<timestamp>/<show_dir>``; for mmseg (whose tool makes
    ``show_dir`` the visualizer's save directory, relative to the current
    directory) they go to ``<work_dir>/<show_dir>``, so a relative
    ``--show-dir`` means the same in both. An absolute ``show_dir`` stays
    as it is. mmseg's hook draws every ``interval``-th batch only (50 by
    default); here, as in mmdet, every prediction is drawn.

    Args:
        cfg (Config): The test config (``default_scope`` mmdet or mmseg).
        show_dir (str, optional): Where the drawings go.
        show (bool): Also show each drawing in a window.
        wait_time (float): Seconds each shown drawing stays up.

    Raises:
        ValueError: The config has no ``default_hooks.visualization``, or
            ``wait_time`` is negative.
    """
    hooks = cfg.get('default_hooks') or {}
    vis = hooks.get('visualization')
    if vis is None:
        raise ValueError('--show/--show-dir need `default_hooks.'
                         'visualization` (DetVisualizationHook or '
                         'SegVisualizationHook) in the config')
    if not wait_time >= 0:
        raise ValueError(f'--wait-time must be >= 0 seconds, got '
                         f'{wait_time}')
    vis['draw'] = True
    if show:
        vis['show'] = True
        vis['wait_time'] = wait_time
    if cfg.default_scope == 'mmdet':
        if show_dir:
            vis['test_out_dir'] = show_dir
    else:
        vis['interval'] = 1
        if show_dir:
            cfg.visualizer['save_dir'] = osp.join(cfg.work_dir, show_dir)


def _dataset_paths(dataset: Any, key: str) -> List[Tuple[str, str, str]]:
    """``(config key, path, 'dir' | 'file')`` of the local paths a dataset
    config names: ``data_root``, ``ann_file`` and ``data_prefix`` entries
    (the latter two joined with ``data_root`` when relative, as mmdet's and
    mmseg's datasets do), through ``dataset``/``datasets`` wrappers."""
    if not isinstance(dataset, dict):
        return []
    if dataset.get('backend_args'):
        return []  # a remote or custom backend: not ours to check
    found: List[Tuple[str, str, str]] = []
    inner = dataset.get('dataset')
    if isinstance(inner, dict):
        found += _dataset_paths(inner, f'{key}.dataset')
    for i, part in enumerate(dataset.get('datasets') or []):
        found += _dataset_paths(part, f'{key}.datasets[{i}]')
    root = dataset.get('data_root')
    local = isinstance(root, str) and bool(root) and '://' not in root
    if local:
        found.append((f'{key}.data_root', root, 'dir'))
    base = root if local else ''

    def joined(path: str) -> str:
        return path if osp.isabs(path) or not base else osp.join(base, path)

    ann = dataset.get('ann_file')
    if isinstance(ann, str) and ann and '://' not in ann:
        found.append((f'{key}.ann_file', joined(ann), 'file'))
    prefix = dataset.get('data_prefix')
    if isinstance(prefix, dict):
        for name, path in prefix.items():
            if isinstance(path, str) and path and '://' not in path:
                found.append((f'{key}.data_prefix.{name}', joined(path),
                              'dir'))
    return found


def check_data_paths(cfg: Config, dataloaders: Sequence[str]) -> None:
    """Refuse a config whose data sets name local paths that do not exist.

    mmdet's and mmseg's own errors for this come late (after the model is
    built) and vary: a missing annotation file fails deep in a json reader,
    a missing image directory can even give an empty data set. This checks
    ``data_root``, ``ann_file`` and ``data_prefix`` of each named
    dataloader's dataset, and the evaluator's ``ann_file``, before anything
    is built.

    Args:
        cfg (Config): The config.
        dataloaders (Sequence[str]): e.g. ``('train_dataloader',
            'val_dataloader')``; missing or None entries are skipped.

    Raises:
        FileNotFoundError: Naming the config key, the path and the working
            directory relative paths are taken from.
    """
    checks: List[Tuple[str, str, str]] = []
    for name in dataloaders:
        loader = cfg.get(name)
        if isinstance(loader, dict):
            checks += _dataset_paths(loader.get('dataset'),
                                     f'{name}.dataset')
        evaluator = cfg.get(name.replace('_dataloader', '_evaluator'))
        for i, ev in enumerate(evaluator if isinstance(evaluator, list)
                               else [evaluator]):
            ann = ev.get('ann_file') if isinstance(ev, dict) else None
            if isinstance(ann, str) and ann and '://' not in ann:
                key = name.replace('_dataloader', '_evaluator')
                checks.append((f'{key}.ann_file', ann, 'file'))
    for key, path, kind in checks:
        exists = osp.isdir(path) if kind == 'dir' else osp.isfile(path)
        if not exists:
            where = '' if osp.isabs(path) else \
                f' (relative to the working directory {os.getcwd()!r})'
            what = 'a directory' if kind == 'dir' else 'a file'
            raise FileNotFoundError(
                f'`{key}` is {path!r}, which does not exist{where}; expected '
                f'{what} of the data set. Fix the path in the config or with '
                f'--cfg-options (the tiny configs\' data is made by '
                f'`python tools/make_tiny_data.py`)')


def _prompt_needs_data_pass(prompt: Any) -> Optional['PromptOptions']:
    """The prompt's options if it needs a data pass before training (and
    ``allow_identity_whitening`` does not waive it), else None.

    A bad ``prompt.type`` or type option is refused here with the error the
    backbone would give, naming ``prompt.<key>``.
    """
    from bpt_mm.models.prompt_config import prompt_type_options
    if not isinstance(prompt, dict) or \
            prompt.get('allow_identity_whitening') is True:
        return None
    options = prompt_type_options(prompt)
    return options if options.needs_data_pass else None


def check_whitening_source(cfg: Config) -> None:
    """Refuse, before anything is built, a training config whose prompts
    need whitening that nothing will provide.

    ``WhitenedPrompt`` and ``BilinearPrompt(whitening_init=True)`` need
    matrices computed from data (``BPTWhiteningHook``, which can also read a
    ``whitening_file``) or restored from a checkpoint (``--resume``,
    ``load_from``); ``SPTPrompt`` likewise needs prototypes of data tokens
    (``BPTWhiteningHook``, never a file). The model itself refuses at the
    first training step (``WhiteningNotReadyError``); this says so before
    data and model are built, naming the config key.

    Raises:
        ValueError: No BPTWhiteningHook in ``custom_hooks``, no checkpoint to
            load and no ``allow_identity_whitening=True``.
    """
    from bpt_mm.engine.whitening_hook import HOOK_TYPES
    from bpt_mm.utils import find_hook_entry
    model = cfg.get('model') or {}
    backbone = model.get('backbone') if isinstance(model, dict) else None
    if not isinstance(backbone, dict) or not str(
            backbone.get('type', '')).endswith('PromptedViT'):
        return
    prompt = backbone.get('prompt')
    options = _prompt_needs_data_pass(prompt)
    if options is None:
        return
    # `resume=True` without `load_from` loads nothing (a first run, or
    # mmengine's own marker lookup): only a checkpoint path counts.
    if find_hook_entry(cfg, HOOK_TYPES) is not None or cfg.get('load_from'):
        return
    kind = str(prompt.get('type')).split('.')[-1]
    what = 'prototypes of training tokens' if options.needs_prototypes \
        else 'whitening matrices'
    init_key = ' with whitening_init=True' if getattr(
        options, 'whitening_init', False) else ''
    raise ValueError(
        f'`model.backbone.prompt.type` is {kind!r}{init_key}'
        f', which needs {what}, but the config has no '
        f"BPTWhiteningHook in `custom_hooks` and no checkpoint to load. "
        f"Add custom_hooks=[dict(type='BPTWhiteningHook', num_images=100)] "
        f"(or dict(type='BPTWhiteningHook', whitening_file=FILE) with a "
        f'file from tools/compute_whitening.py), or set '
        f'`model.backbone.prompt.allow_identity_whitening=True`')
