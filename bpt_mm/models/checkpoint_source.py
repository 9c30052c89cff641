"""Checkpoint names as mmengine accepts them, turned into local files.

mmengine's ``Pretrained`` initialiser and its ``CheckpointLoader`` accept,
besides local paths:

* ``http://``/``https://`` URLs and model-zoo names
  (``torchvision://resnet50``, ``open-mmlab://resnet50_v1c``,
  ``mmcls://...``), whose URLs come from mmengine's tables
  (``mmengine/hub``; ``open-mmlab://`` names can be added in
  ``$MMENGINE_HOME/open_mmlab.json``, where a value that is not a URL is a
  file under ``$MMENGINE_HOME``);
* names whose prefix is served by one of mmengine's file backends
  (``mmengine.fileio``: ``s3://`` and ``petrel://``, also as
  ``cluster:s3://``, and any prefix a project registers with
  ``mmengine.fileio.register_backend(..., prefixes=...)``).

mmengine's own loaders for them unpickle the file with
``weights_only=False``. Here every such name is only *turned into a local
file* by :func:`local_checkpoint`: a URL or model-zoo file is downloaded
once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``); the bytes of
a file-backend name are read with that backend's ``get`` into a temporary
file, deleted after reading. The local, weights-only readers then read it
exactly as a local file (zip only, size limits, no code run):
:func:`bpt_mm.models.checkpoint.load_pretrained` for ``init_cfg``, and
mmengine's local loader (:mod:`bpt_mm.engine.checkpoint_io`) for
``load_from``/``--resume`` through :func:`install_remote_loaders`. Any other
``prefix://`` (``pavi://``, whose mmengine loader downloads through the
``pavi`` package and no file backend; a misspelt scheme) is refused, naming
the prefix.
"""
import contextlib
import os
import os.path as osp
import tempfile
from typing import Callable, Iterator, Optional
from urllib.parse import urlparse

#: Schemes resolved here by download (mmengine's spellings,
#: ``modelzoo://`` being its deprecated name for ``torchvision://``).
REMOTE_PREFIXES = ('http://', 'https://', 'torchvision://', 'modelzoo://',
                   'open-mmlab://', 'openmmlab://', 'mmcls://')

#: A ``CheckpointLoader`` scheme (a regular expression) that every other
#: ``prefix://`` name matches, with mmengine's optional ``cluster:`` before
#: the prefix.
ANY_PREFIX_SCHEME = r'([\w.+-]+:)?[\w.+-]+://'


def is_remote(name: str) -> bool:
    """Whether ``name`` is a URL or model-zoo name :func:`local_checkpoint`
    downloads."""
    return isinstance(name, str) and name.startswith(REMOTE_PREFIXES)


def file_backend_prefix(name: str) -> Optional[str]:
    """The ``mmengine.fileio`` prefix of ``name`` (``'s3'`` for
    ``'s3://b/x'`` and ``'cluster:s3://b/x'``, as mmengine parses it), or
    None for a local path or a name :func:`is_remote` covers.

    Raises:
        ValueError: A ``prefix://`` that no mmengine file backend serves,
            naming it and the ones that are.
    """
    if not isinstance(name, str) or '://' not in name or is_remote(name):
        return None
    from mmengine.fileio.backends.registry_utils import prefix_to_backends
    prefix = name.split('://', 1)[0].rsplit(':', 1)[-1]
    if prefix not in prefix_to_backends:
        served = sorted(p for p in prefix_to_backends
                        if p and p + '://' not in REMOTE_PREFIXES)
        raise ValueError(
            f'checkpoint {name!r}: no mmengine file backend serves the '
            f'prefix {prefix + "://"!r} (bpt_mm reads local paths, '
            f'{list(REMOTE_PREFIXES)} and the file-backend prefixes '
            f'{[p + "://" for p in served]}); download the file and give its '
            f'path, or register a backend for it with '
            f'mmengine.fileio.register_backend(..., prefixes={prefix!r})')
    return prefix


def is_local_path(name: str) -> bool:
    """Whether ``name`` is a local path (the tools check that it is a file
    before building anything) rather than a name read through a download
    or a file backend (checked when read: the download or the backend
    names a missing file).

    Raises:
        ValueError: A ``prefix://`` that nothing serves, as
            :func:`file_backend_prefix` says.
    """
    return not is_remote(name) and file_backend_prefix(name) is None


def _backend_bytes(name: str, prefix: str) -> bytes:
    """The bytes of ``name``, read by mmengine's file backend of
    ``prefix``."""
    from mmengine.fileio import get_file_backend

    from ..safe_load import CheckpointError
    try:
        backend = get_file_backend(name)
    except Exception as exc:  # noqa: BLE001 (e.g. its client not installed)
        raise ValueError(
            f'checkpoint {name!r}: mmengine\'s file backend for '
            f'{prefix + "://"!r} cannot be used here '
            f'({type(exc).__name__}: {exc})') from exc
    try:
        data = backend.get(name)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f'cannot read checkpoint {name!r} through mmengine\'s '
            f'{type(backend).__name__} ({type(exc).__name__}: {exc})'
        ) from exc
    # A registered backend is the project's code: its `get` may return
    # text or None, which would otherwise fail unnamed in the write.
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointError(
            f'cannot read checkpoint {name!r}: mmengine\'s '
            f'{type(backend).__name__}.get returned a '
            f'{type(data).__name__}, not bytes')
    return data


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
        try:
            torch.hub.download_url_to_file(url, target, progress=False)
        except OSError as exc:  # urllib's errors do not name the URL
            raise OSError(f'cannot download checkpoint {url!r} '
                          f'({type(exc).__name__}: {exc})') from exc
    if distributed:
        dist.barrier()
    return target


@contextlib.contextmanager
def local_checkpoint(name: str) -> Iterator[str]:
    """The local file a checkpoint name stands for, while the ``with``
    block reads it.

    A :class:`~bpt_mm.safe_load.CheckpointError` raised in the block names
    ``name`` (a temporary copy's path is replaced by it; a downloaded file
    keeps its cached path and says where it came from).

    Args:
        name (str): A local path, an ``http(s)://`` URL, a model-zoo name or
            a file-backend name (see the module docstring).

    Yields:
        str: ``name`` itself when local; else the downloaded (cached),
        ``$MMENGINE_HOME`` or temporary file.

    Raises:
        KeyError: A model-zoo name mmengine's tables do not have.
        ValueError: A prefix no file backend serves (``pavi://``...), or a
            file backend that cannot be made here (its client missing).
        FileNotFoundError: The backend has no such file.
        OSError: The download failed (naming the URL and urllib's
            reason).

    Examples:
        >>> with local_checkpoint('work_dirs/iter_4.pth') as path:
        ...     path
        'work_dirs/iter_4.pth'
    """
    from ..safe_load import CheckpointError
    prefix = file_backend_prefix(name)
    if prefix is not None:
        data = _backend_bytes(name, prefix)
        with tempfile.TemporaryDirectory(prefix='bpt_mm_ckpt_') as folder:
            # ('.' and '..' name folders: a name ending so gets a file.)
            base = osp.basename(name)
            copy = osp.join(folder, base if base.strip('.') else
                            'checkpoint.pth')
            with open(copy, 'wb') as f:
                f.write(data)
            del data
            try:
                yield copy
            except CheckpointError as exc:
                raise CheckpointError(str(exc).replace(copy, name)) from exc
        return
    if not is_remote(name):
        yield name
        return
    url = name if name.startswith(('http://', 'https://')) else _zoo_url(name)
    local = url if not url.startswith(('http://', 'https://')) \
        else _download(url)
    try:
        yield local
    except CheckpointError as exc:
        # The message names the cached copy; say where it came from.
        raise CheckpointError(f'{exc} (downloaded from {name})') from exc


def _remote_loader(read_local: Callable) -> Callable:
    # mmengine logs the loader's name after 'load_from_' ("Loads
    # checkpoint by remote backend").
    def load_from_remote(filename: str,
                         map_location: Optional[object] = None):
        with local_checkpoint(filename) as local:
            return read_local(local, map_location=map_location)
    return load_from_remote


def install_remote_loaders(read_local: Callable) -> None:
    """Make mmengine's ``CheckpointLoader`` turn every name with a
    ``prefix://`` (:data:`REMOTE_PREFIXES`, mmengine's other schemes such as
    ``s3://``, ``petrel://`` and ``pavi://``, and any other prefix) into a
    local file with :func:`local_checkpoint` and read it with
    ``read_local`` (its local loader), instead of mmengine's loaders, which
    unpickle with ``weights_only=False``. A scheme a project registered
    itself (``CheckpointLoader.register_scheme``), before or after this,
    keeps its loader. Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader

    # mmengine's own keys are replaced (the same keys, so that its loader
    # cannot match first), whatever this mmengine version registers; a
    # project's own loaders stay, whether imported before bpt_mm or after.
    replaced = ('mmengine.runner.checkpoint', __name__)
    others = [p for p, loader in CheckpointLoader._schemes.items()
              if p and p not in REMOTE_PREFIXES
              and getattr(loader, '__module__', None) in replaced]
    CheckpointLoader.register_scheme(
        prefixes=list(REMOTE_PREFIXES) + others + [ANY_PREFIX_SCHEME],
        loader=_remote_loader(read_local), force=True)
