"""What ``tools/train.py`` and ``tools/test.py`` share: config loading with
the scope check, distributed set-up (gloo on machines without a GPU), AMP and
visualisation switches, and the runner itself.

The tools stay thin scripts over these functions, as mmdet's and mmseg's do.
"""
import argparse
import os
import os.path as osp
from typing import Any, Dict, Optional

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


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Draw test predictions into ``show_dir`` (``--show-dir``).

    mmdet's ``DetVisualizationHook`` and mmseg's ``SegVisualizationHook``
    take the switch differently; both are handled.

    Raises:
        ValueError: The config has no ``default_hooks.visualization``.
    """
    hooks = cfg.get('default_hooks') or {}
    vis = hooks.get('visualization')
    if vis is None:
        raise ValueError('--show-dir needs `default_hooks.visualization` '
                         '(DetVisualizationHook or SegVisualizationHook) in '
                         'the config')
    vis['draw'] = True
    if cfg.default_scope == 'mmdet':
        vis['test_out_dir'] = osp.abspath(show_dir)
    else:
        # SegVisualizationHook draws every `interval`-th batch only (50 by
        # default); --show-dir means every prediction, as in mmdet.
        vis['interval'] = 1
        cfg.visualizer['save_dir'] = osp.abspath(show_dir)


def build_runner(cfg: Config):
    """The runner the config asks for (``runner_type``) or mmengine's."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
