"""Distributed start-up and mixed precision: NCCL with one process per GPU,
gloo on machines without one; bf16 where the GPU computes it natively, else
fp16.
"""
import os
from typing import Any, Optional

import torch
from mmengine.config import Config


#: ``--launcher`` choices, as mmdet's and mmseg's tools take them.
LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
#: ``--amp-dtype`` choices and the ``AmpOptimWrapper.dtype`` each gives.
AMP_DTYPES = {'bf16': 'bfloat16', 'fp16': 'float16'}


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
