"""What ``tools/train.py`` and ``tools/test.py`` share: config loading with
the scope check, distributed set-up (gloo on machines without a GPU), AMP and
visualisation switches, and the runner itself.

The tools stay thin scripts over these functions, as mmdet's and mmseg's do.
"""
import argparse
import os
import os.path as osp
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, DictAction

#: The OpenMMLab libraries whose configs the tools run, by ``default_scope``.
SCOPES = ('mmdet', 'mmseg')
LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def load_config(path: str,
                cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """Read a config, merge ``--cfg-options`` and check its scope.

    Args:
        path (str): The config file.
        cfg_options (dict, optional): ``key=value`` overrides
            (``mmengine.config.DictAction``).

    Returns:
        Config: The merged config.

    Raises:
        FileNotFoundError: No such file.
        ValueError: ``default_scope`` is missing or not one of
            :data:`SCOPES`.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path!r}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(
            f'`default_scope` of {path!r} must be one of {list(SCOPES)} (it '
            f'selects mmdet or mmseg), got {scope!r}; inherit an mmdet or '
            f"mmseg base such as 'mmdet::_base_/default_runtime.py'")
    # bpt_mm's classes must be registered whatever the config imports.
    import bpt_mm  # noqa: F401
    return cfg


def default_work_dir(config_path: str) -> str:
    """``./work_dirs/<config name>``, the mmdet/mmseg default."""
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def add_common_arguments(parser: argparse.ArgumentParser,
                         example_option: str) -> None:
    """The flags train.py and test.py share: ``--work-dir``,
    ``--cfg-options``, ``--launcher`` and ``--local_rank``."""
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help=f'override config keys, e.g. {example_option}')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='job launcher')
    # torch < 2 launchers pass --local_rank, torchrun sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def config_from_args(args: argparse.Namespace) -> Config:
    """Load ``args.config`` with ``--cfg-options``, set the work dir and the
    launcher (see :func:`load_config` and :func:`setup_launcher`)."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or \
        default_work_dir(args.config)
    setup_launcher(cfg, args.launcher)
    return cfg


def _rank_env_from(launcher: str) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK from the launcher's own variables."""
    if launcher == 'slurm':
        names = dict(RANK='SLURM_PROCID', WORLD_SIZE='SLURM_NTASKS',
                     LOCAL_RANK='SLURM_LOCALID')
    elif launcher == 'mpi':
        names = dict(RANK='OMPI_COMM_WORLD_RANK',
                     WORLD_SIZE='OMPI_COMM_WORLD_SIZE',
                     LOCAL_RANK='OMPI_COMM_WORLD_LOCAL_RANK')
    else:
        names = {}
    for ours, theirs in names.items():
        if ours not in os.environ and theirs in os.environ:
            os.environ[ours] = os.environ[theirs]
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher {launcher} on a machine without a GPU needs the '
            f'environment variables {missing}; start it with '
            f'tools/dist_train.sh (torchrun sets them)')
    os.environ.setdefault('LOCAL_RANK', '0')


def setup_launcher(cfg: Config, launcher: str) -> None:
    """Set ``cfg.launcher`` and, without a GPU, start gloo ourselves.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` and its DDP
    wrapper passes ``device_ids=[LOCAL_RANK]``; both fail on a CPU-only
    machine. There the process group is started here with the gloo backend
    (mmengine then sees it and leaves it alone) and DDP gets
    ``device_ids=None``, so ``tools/dist_train.sh CONFIG 2`` runs on a CPU.

    Raises:
        ValueError: ``launcher`` is not one of :data:`LAUNCHERS`.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'--launcher must be one of {list(LAUNCHERS)}, got '
                         f'{launcher!r}')
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    import torch.distributed as dist
    _rank_env_from(launcher)
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = \
        'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper['device_ids'] = None  # CPU modules take no device ids
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters',
                       cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def enable_amp(cfg: Config) -> None:
    """Switch the optimizer wrapper to mixed precision (``--amp``).

    Raises:
        RuntimeError: No CUDA device (mmengine's ``AmpOptimWrapper`` needs
            one).
        ValueError: The config's ``optim_wrapper.type`` is neither
            ``OptimWrapper`` nor ``AmpOptimWrapper``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError('--amp needs a CUDA GPU: mmengine\'s '
                           'AmpOptimWrapper runs on CUDA only')
    kind = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if kind == 'AmpOptimWrapper':
        return
    if kind != 'OptimWrapper':
        raise ValueError(f'--amp replaces `optim_wrapper.type` '
                         f"'OptimWrapper' by 'AmpOptimWrapper', but the "
                         f'config has {kind!r}')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


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


def _prompt_needs_whitening(prompt: Any) -> bool:
    if not isinstance(prompt, dict):
        return False
    kind = str(prompt.get('type', '')).split('.')[-1]
    if prompt.get('allow_identity_whitening') is True:
        return False
    return kind == 'WhitenedPrompt' or (
        kind == 'BilinearPrompt' and prompt.get('whitening_init') is True)


def check_whitening_source(cfg: Config) -> None:
    """Refuse, before anything is built, a training config whose prompts
    need whitening that nothing will provide.

    ``WhitenedPrompt`` and ``BilinearPrompt(whitening_init=True)`` need
    matrices computed from data (``BPTWhiteningHook``, which can also read a
    ``whitening_file``) or restored from a checkpoint (``--resume``,
    ``load_from``). The model itself refuses at the first training step
    (``WhiteningNotReadyError``); this says so before data and model are
    built, naming the config key.

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
    if not _prompt_needs_whitening(prompt):
        return
    # `resume=True` without `load_from` loads nothing (a first run, or
    # mmengine's own marker lookup): only a checkpoint path counts.
    if find_hook_entry(cfg, HOOK_TYPES) is not None or cfg.get('load_from'):
        return
    kind = str(prompt.get('type')).split('.')[-1]
    raise ValueError(
        f'`model.backbone.prompt.type` is {kind!r}'
        f"{' with whitening_init=True' if kind == 'BilinearPrompt' else ''}"
        f', which needs whitening matrices, but the config has no '
        f"BPTWhiteningHook in `custom_hooks` and no checkpoint to load. "
        f"Add custom_hooks=[dict(type='BPTWhiteningHook', num_images=100)] "
        f"(or dict(type='BPTWhiteningHook', whitening_file=FILE) with a "
        f'file from tools/compute_whitening.py), or set '
        f'`model.backbone.prompt.allow_identity_whitening=True`')


_CKPT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` (without a path) continues from.

    mmengine's ``last_checkpoint`` marker when it names an existing file.
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
    if named and osp.isfile(named):
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


def build_prompted_model(cfg: Config, checkpoint: Optional[str] = None,
                         device: str = 'cpu'):
    """Build ``cfg.model`` as training would start it (``init_weights``,
    then ``checkpoint`` if given) on ``device``, for the offline tools.

    Returns:
        tuple: The model and its :class:`PromptedViT` (the model itself or
        its ``backbone``).

    Raises:
        ValueError: If the model has no PromptedViT backbone.
    """
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    from bpt_mm.models.vit import find_prompted_backbone
    model = MODELS.build(cfg.model)  # in the config's default scope
    model.init_weights()
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model.to(device)
    backbone = find_prompted_backbone(model)
    if backbone is None:
        raise ValueError('the model is not a PromptedViT and has no '
                         'PromptedViT backbone')
    return model, backbone


def build_runner(cfg: Config):
    """The runner the config asks for (``runner_type``) or mmengine's."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
