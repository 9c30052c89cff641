"""Checkpoint names as mmengine accepts them, turned into local files.

mmengine's ``Pretrained`` initialiser and its ``CheckpointLoader`` accept,
besides local paths, ``http://``/``https://`` URLs and model-zoo names
(``torchvision://resnet50``, ``open-mmlab://resnet50_v1c``,
``mmcls://...``), whose URLs come from mmengine's tables (``mmengine/hub``;
``open-mmlab://`` names can be added in ``$MMENGINE_HOME/open_mmlab.json``,
where a value that is not a URL is a file under ``$MMENGINE_HOME``).
mmengine's own loaders for them unpickle the download with
``weights_only=False``. Here every such name is only *resolved to a local
file* (downloaded once into torch's hub cache,
``$TORCH_HOME/hub/checkpoints``), which the local, weights-only readers
then read: :func:`bpt_mm.models.checkpoint.load_checkpoint_file` for
``init_cfg``, and mmengine's local loader (:mod:`bpt_mm.engine.checkpoint_io`)
for ``load_from``/``--resume`` through :func:`install_remote_loaders`.
"""
import os
import os.path as osp
from typing import Callable, Optional
from urllib.parse import urlparse

#: Schemes resolved here (mmengine's spellings, ``modelzoo://`` being its
#: deprecated name for ``torchvision://``).
REMOTE_PREFIXES = ('http://', 'https://', 'torchvision://', 'modelzoo://',
                   'open-mmlab://', 'openmmlab://', 'mmcls://')


def is_remote(name: str) -> bool:
    """Whether ``name`` is a URL or model-zoo name :func:`local_checkpoint`
    resolves."""
    return isinstance(name, str) and name.startswith(REMOTE_PREFIXES)


def _zoo_url(name: str) -> str:
    """The URL (or ``$MMENGINE_HOME`` file) mmengine's tables give a
    model-zoo name."""
    # mmengine's own tables, so a name means what it means in mmengine.
    from mmengine.runner.checkpoint import (_get_mmengine_home,
                                            get_deprecated_model_names,
                                            get_external_models,
                                            get_mmcls_models,
                                            get_torchvision_models)
    scheme, _, model = name.partition('://')
    if scheme in ('torchvision', 'modelzoo'):
        table = get_torchvision_models()
    elif scheme == 'mmcls':
        table = get_mmcls_models()
    else:
        table = get_external_models()
        model = get_deprecated_model_names().get(model, model)
    if model not in table:
        raise KeyError(
            f'{name!r}: mmengine knows no {scheme}:// checkpoint {model!r} '
            f'({len(table)} names, e.g. {sorted(table)[:3]}); give a local '
            f'path or an https:// URL')
    url = table[model]
    if url.startswith(('http://', 'https://')):
        return url
    # open-mmlab:// entries may name a file under $MMENGINE_HOME.
    return osp.join(_get_mmengine_home(), url)


def _download(url: str) -> str:
    """``url`` downloaded once into torch's hub cache; the cached file.

    In a distributed job rank 0 downloads first and the others wait, as in
    mmengine.
    """
    import torch
    import torch.distributed as dist
    folder = osp.join(torch.hub.get_dir(), 'checkpoints')
    target = osp.join(folder, osp.basename(urlparse(url).path) or 'download')
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if rank == 0 and not osp.isfile(target):
        os.makedirs(folder, exist_ok=True)
        # Written to a temporary file and renamed by torch: never a
        # partial file under the cached name.
        torch.hub.download_url_to_file(url, target, progress=False)
    if distributed:
        dist.barrier()
    return target


def local_checkpoint(name: str) -> str:
    """The local file a checkpoint name stands for.

    Args:
        name (str): A local path, an ``http(s)://`` URL or a model-zoo name
            (see the module docstring).

    Returns:
        str: ``name`` itself when local; else the downloaded (cached) or
        ``$MMENGINE_HOME`` file.

    Raises:
        KeyError: A model-zoo name mmengine's tables do not have.
        ValueError: Another scheme (``s3://``, ``pavi://``...), which
            bpt_mm does not read.
        OSError: The download failed (the message of urllib names why).
    """
    if not is_remote(name):
        if isinstance(name, str) and '://' in name:
            raise ValueError(
                f'checkpoint {name!r}: bpt_mm reads local paths and '
                f'{list(REMOTE_PREFIXES)}; download the file and give its '
                f'path')
        return name
    url = name if name.startswith(('http://', 'https://')) else _zoo_url(name)
    if not url.startswith(('http://', 'https://')):
        return url
    return _download(url)


def _remote_loader(read_local: Callable) -> Callable:
    def load(filename: str, map_location: Optional[object] = None):
        from ..safe_load import CheckpointError
        local = local_checkpoint(filename)
        try:
            return read_local(local, map_location=map_location)
        except CheckpointError as exc:
            # The message names the cached copy; say where it came from.
            if local == filename:
                raise
            raise CheckpointError(f'{exc} (downloaded from {filename})') \
                from exc
    return load


def install_remote_loaders(read_local: Callable) -> None:
    """Make mmengine's ``CheckpointLoader`` resolve :data:`REMOTE_PREFIXES`
    to local files and read them with ``read_local`` (its local loader),
    instead of mmengine's loaders, which unpickle downloads with
    ``weights_only=False``. Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes=REMOTE_PREFIXES,
                                     loader=_remote_loader(read_local),
                                     force=True)
