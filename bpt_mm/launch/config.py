"""Config files and the runner: load a config with its scope checked, the flags
the tools share, work-dir and loop checks, and building the model or runner.
"""
import argparse
import os
import os.path as osp
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config, DictAction

from .distributed import LAUNCHERS, setup_launcher


#: The OpenMMLab libraries whose configs the tools run, by ``default_scope``.
SCOPES = ('mmdet', 'mmseg')


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
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='passed by torch < 2 launchers; a LOCAL_RANK '
                        'in the environment (torchrun) wins (default 0)')


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


def seed_as_the_runner(cfg: Config, fallback: Optional[int] = None) -> int:
    """Seed the random generators from the config's ``randomness``, as
    mmengine's Runner does before it builds the model, so that an offline
    tool builds a random (e.g. tiny, not pretrained) backbone with the
    weights training starts from; a whitening file of other weights would
    be refused by the training run's fingerprint check.

    Args:
        cfg (Config): The config.
        fallback (int, optional): The seed when the config sets none (then
            the Runner draws one at random, and no tool can match it).

    Returns:
        int: The seed used.
    """
    from mmengine.runner import set_random_seed
    randomness = dict(cfg.get('randomness') or {})
    if randomness.get('seed') is None:
        randomness['seed'] = fallback
    return set_random_seed(**randomness)


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
