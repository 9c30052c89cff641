"""What ``tools/train.py`` and ``tools/test.py`` share: config loading with
the scope check, distributed set-up (NCCL with one process per GPU, gloo on
machines without a GPU), AMP (bf16 where the GPU has it) and visualisation
switches, and the runner itself.

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
#: ``--amp-dtype`` choices and the ``AmpOptimWrapper.dtype`` each gives.
AMP_DTYPES = {'bf16': 'bfloat16', 'fp16': 'float16'}


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


def resolve_device(device: Optional[str]) -> str:
    """The device of a ``--device`` flag: ``cuda`` when available and none
    is given, else ``cpu``.

    Raises:
        ValueError: Not a torch device, or a CUDA device on a machine
            without one; naming ``--device``.
    """
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f'--device {device!r} is not a torch device '
                         f"(e.g. 'cpu', 'cuda', 'cuda:1'): {exc}") from None
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {device!r}: this machine has no '
                             f"CUDA device; use --device cpu")
        if parsed.index is not None and \
                parsed.index >= torch.cuda.device_count():
            raise ValueError(f'--device {device!r}: only '
                             f'{torch.cuda.device_count()} CUDA device(s)')
    return device


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
        from bpt_mm.whitening_collect import FILE_FORMAT
        try:
            existing = torch.load(path, map_location='cpu', weights_only=True)
        except Exception:  # noqa: BLE001 (anything else is not ours)
            existing = None
        if not (isinstance(existing, dict)
                and existing.get('format') == FILE_FORMAT):
            raise ValueError(
                f'{flag} {path!r} exists and is not a whitening file this '
                f'tool wrote; it is left as it is. Choose another path')


def check_work_dir(work_dir: str) -> None:
    """Refuse a ``--work-dir`` that is an existing file.

    Raises:
        ValueError: Naming ``--work-dir`` and the path.
    """
    if osp.lexists(work_dir) and not osp.isdir(work_dir):
        raise ValueError(f'--work-dir {work_dir!r} is an existing file, not '
                         f'a folder; logs and checkpoints need a folder')


def check_loop_settings(cfg: Config) -> None:
    """Refuse loop lengths and intervals that are not positive ints, e.g.
    ``--cfg-options train_cfg.max_iters=abc`` (a string to mmengine, which
    fails much later in a comparison).

    Raises:
        ValueError: Naming the config key and the value.
    """
    for loop in ('train_cfg', 'val_cfg', 'test_cfg'):
        section = cfg.get(loop)
        if not isinstance(section, dict):
            continue
        for key in ('max_iters', 'max_epochs', 'val_interval', 'val_begin'):
            if key not in section:
                continue
            value = section[key]
            low = 0 if key == 'val_begin' else 1
            if isinstance(value, bool) or not isinstance(value, int) or \
                    value < low:
                raise ValueError(
                    f'`{loop}.{key}` must be an int >= {low}, got {value!r} '
                    f'({type(value).__name__})')


def config_from_args(args: argparse.Namespace) -> Config:
    """Load ``args.config`` with ``--cfg-options``, set the work dir and the
    launcher (see :func:`load_config` and :func:`setup_launcher`)."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or \
        default_work_dir(args.config)
    check_work_dir(cfg.work_dir)
    check_loop_settings(cfg)
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


def _set_dist_backend(cfg: Config, backend: str,
                      keep_configured: bool) -> None:
    """Set ``env_cfg.dist_cfg.backend``, or only fill it in when
    ``keep_configured``. (``Config.setdefault`` stores a converted copy of
    a new dict, so the dicts are rebuilt and assigned.)"""
    env_cfg = dict(cfg.get('env_cfg') or {})
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    if not (keep_configured and dist_cfg.get('backend')):
        dist_cfg['backend'] = backend
    env_cfg['dist_cfg'] = dist_cfg
    cfg.env_cfg = env_cfg


def setup_launcher(cfg: Config, launcher: str) -> None:
    """Set ``cfg.launcher``; NCCL on GPUs, gloo (started here) without.

    With CUDA, mmengine starts the process group with the config's
    ``env_cfg.dist_cfg.backend`` (NCCL unless the config says otherwise, as
    in mmdet's and mmseg's ``default_runtime``) and puts each process on the
    GPU numbered by its ``LOCAL_RANK``: one process per GPU, so a
    ``LOCAL_RANK`` past the last GPU is refused here with the GPU count.

    Without CUDA: mmengine's ``init_dist`` calls ``torch.cuda.set_device``
    and its DDP wrapper passes ``device_ids=[LOCAL_RANK]``; both fail on a
    CPU-only machine. There the process group is started here with the
    gloo backend (mmengine then sees it and leaves it alone) and DDP gets
    ``device_ids=None``, so ``tools/dist_train.sh CONFIG 2`` runs on a CPU.

    Raises:
        ValueError: ``launcher`` is not one of :data:`LAUNCHERS`.
        RuntimeError: More processes on this node than GPUs.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'--launcher must be one of {list(LAUNCHERS)}, got '
                         f'{launcher!r}')
    cfg.launcher = launcher
    if launcher == 'none':
        return
    if torch.cuda.is_available():
        _set_dist_backend(cfg, 'nccl', keep_configured=True)
        local_rank = os.environ.get('LOCAL_RANK')
        gpus = torch.cuda.device_count()
        if local_rank is not None and int(local_rank) >= gpus:
            raise RuntimeError(
                f'LOCAL_RANK {local_rank} needs GPU {local_rank}, but this '
                f'node has {gpus} GPU(s): start at most {gpus} processes per '
                f'node (tools/dist_train.sh CONFIG {gpus})')
        return
    import torch.distributed as dist
    _rank_env_from(launcher)
    _set_dist_backend(cfg, 'gloo', keep_configured=False)
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper['device_ids'] = None  # CPU modules take no device ids
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters',
                       cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def native_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (compute capability
    8.0 and up). torch's ``is_bf16_supported()`` also counts emulation,
    which is slow, and its switch for that is missing before torch 2.3."""
    return torch.cuda.get_device_capability()[0] >= 8


def bf16_blocker(cfg: Config) -> Optional[str]:
    """Why the model of ``cfg`` cannot run under bf16 autocast, or None.

    mmcv 2.1's CUDA kernels of ``RoIAlign`` (mmdet's RoI heads: Mask R-CNN,
    Cascade Mask R-CNN) dispatch on float32, float64 and float16 only
    (``AT_DISPATCH_FLOATING_TYPES_AND_HALF``): bf16 features stop there.
    """
    model = cfg.get('model') or {}
    if model.get('roi_head'):
        return ("the model's RoI head uses mmcv's RoIAlign, whose CUDA "
                'kernels (mmcv 2.1) take float32 and float16 only')
    return None


def amp_dtype(requested: Optional[str] = None,
              blocker: Optional[str] = None) -> str:
    """The autocast dtype of ``--amp``: bf16 where the GPU computes it
    natively (compute capability 8.0 and up) and the model can run it,
    else fp16.

    bf16 has fp32's exponent range, so a loss that fp16 would overflow stays
    finite; on older GPUs bf16 is only emulated (slow), so fp16 it is.

    Args:
        requested: ``--amp-dtype``: ``'bf16'``, ``'fp16'`` or None (choose).
        blocker: Why the model cannot run bf16 (:func:`bf16_blocker`), or
            None.

    Returns:
        ``'bfloat16'`` or ``'float16'`` (``AmpOptimWrapper.dtype``).

    Raises:
        ValueError: ``requested`` is not a key of :data:`AMP_DTYPES`, or is
            ``'bf16'`` on a GPU without native bf16 or for a model that
            cannot run it.
    """
    if requested is None:
        bf16 = blocker is None and native_bf16()
        return AMP_DTYPES['bf16' if bf16 else 'fp16']
    if requested not in AMP_DTYPES:
        raise ValueError(f'--amp-dtype must be one of {list(AMP_DTYPES)}, '
                         f'got {requested!r}')
    if requested == 'bf16' and blocker is not None:
        raise ValueError(f'--amp-dtype bf16: {blocker}; use --amp-dtype '
                         f'fp16')
    if requested == 'bf16' and not native_bf16():
        raise ValueError(
            f'--amp-dtype bf16: {torch.cuda.get_device_name()} has no native '
            f'bf16 (compute capability below 8.0); use --amp-dtype fp16')
    return AMP_DTYPES[requested]


def _configured_amp_dtype(configured: Any,
                          blocker: Optional[str]) -> Any:
    """Check a config's ``optim_wrapper.dtype`` as :func:`amp_dtype` checks
    ``--amp-dtype``, and return it unchanged.

    Args:
        configured: ``optim_wrapper.dtype``: ``'float16'``, ``'bfloat16'``
            or the torch dtype (what mmengine's ``AmpOptimWrapper`` takes).
        blocker: Why the model cannot run bf16, or None.

    Raises:
        ValueError: Another value, or bf16 for a model with a blocker or on
            a GPU without native bf16; the message names
            ``optim_wrapper.dtype``.
    """
    name = str(configured).replace('torch.', '') if isinstance(
        configured, (str, torch.dtype)) else None
    if name not in AMP_DTYPES.values():
        raise ValueError(f'optim_wrapper.dtype must be one of '
                         f'{sorted(AMP_DTYPES.values())} for --amp, got '
                         f'{configured!r}')
    if name == 'bfloat16' and blocker is not None:
        raise ValueError(f'optim_wrapper.dtype={configured!r}: {blocker}; '
                         f"set it to 'float16' (or --amp-dtype fp16 without "
                         f'it)')
    if name == 'bfloat16' and not native_bf16():
        raise ValueError(
            f'optim_wrapper.dtype={configured!r}: '
            f'{torch.cuda.get_device_name()} has no native bf16 (compute '
            f"capability below 8.0); set it to 'float16'")
    return configured


def enable_amp(cfg: Config, dtype: Optional[str] = None) -> None:
    """Switch the optimizer wrapper to mixed precision (``--amp``).

    Args:
        cfg: The config to change.
        dtype: ``--amp-dtype`` (``'bf16'``/``'fp16'``), or None for
            :func:`amp_dtype`'s choice (fp16 for models with RoI heads, see
            :func:`bf16_blocker`); a config that already sets
            ``optim_wrapper.dtype`` keeps it unless ``dtype`` is given.

    Raises:
        RuntimeError: No CUDA device (mmengine's ``AmpOptimWrapper`` needs
            one).
        ValueError: The config's ``optim_wrapper.type`` is neither
            ``OptimWrapper`` nor ``AmpOptimWrapper``; ``dtype`` is not
            available (see :func:`amp_dtype`) or contradicts the config's
            ``optim_wrapper.dtype``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError('--amp needs a CUDA GPU: mmengine\'s '
                           'AmpOptimWrapper runs on CUDA only')
    kind = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if kind not in ('OptimWrapper', 'AmpOptimWrapper'):
        raise ValueError(f'--amp replaces `optim_wrapper.type` '
                         f"'OptimWrapper' by 'AmpOptimWrapper', but the "
                         f'config has {kind!r}')
    configured = cfg.optim_wrapper.get('dtype')
    if configured is not None and dtype is None:
        # The config's own dtype is kept, but under the same rules as a
        # chosen one: a bf16 there would otherwise reach mmcv's RoIAlign (or
        # an emulating GPU) and fail, or crawl, only once training runs.
        chosen = _configured_amp_dtype(configured, bf16_blocker(cfg))
    else:
        chosen = amp_dtype(dtype, bf16_blocker(cfg))
        if configured is not None and configured != chosen:
            raise ValueError(f'--amp-dtype {dtype} asks for {chosen!r}, but '
                             f'the config sets optim_wrapper.dtype='
                             f'{configured!r}; drop one of them')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.dtype = chosen
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


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


def _prompt_needs_whitening(prompt: Any) -> bool:
    if not isinstance(prompt, dict):
        return False
    kind = str(prompt.get('type', '')).split('.')[-1]
    if prompt.get('allow_identity_whitening') is True:
        return False
    return kind in ('WhitenedPrompt', 'SPTPrompt') or (
        kind == 'BilinearPrompt' and prompt.get('whitening_init') is True)


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
    if not _prompt_needs_whitening(prompt):
        return
    # `resume=True` without `load_from` loads nothing (a first run, or
    # mmengine's own marker lookup): only a checkpoint path counts.
    if find_hook_entry(cfg, HOOK_TYPES) is not None or cfg.get('load_from'):
        return
    kind = str(prompt.get('type')).split('.')[-1]
    what = 'prototypes of training tokens' if kind == 'SPTPrompt' \
        else 'whitening matrices'
    raise ValueError(
        f'`model.backbone.prompt.type` is {kind!r}'
        f"{' with whitening_init=True' if kind == 'BilinearPrompt' else ''}"
        f', which needs {what}, but the config has no '
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
    from bpt_mm.whitening_collect import FILE_FORMAT
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
    from bpt_mm.whitening_collect import FILE_FORMAT
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
