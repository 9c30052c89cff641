"""Read mmengine training checkpoints on torch >= 2.6 without running code.

torch >= 2.6 loads with ``weights_only=True`` by default. mmengine 0.10's
runner still calls a bare ``torch.load`` in ``--resume`` and ``load_from``,
and its checkpoints hold more than tensors: the message hub pickles
``HistoryBuffer`` objects (with numpy arrays and bound statistics methods),
so resuming fails with an ``UnpicklingError``. The usual advice, setting
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, lets any file run any code.

This module keeps the refusal and widens it by exactly what mmengine writes:
a file is first read with ``weights_only=True``; only if that refuses it, it
is read again by an unpickler that constructs nothing but an allow-list of
classes (tensors, containers, numpy arrays and dtypes, ``HistoryBuffer``) and
allows ``getattr`` only for a ``HistoryBuffer``'s public methods. Anything
else is refused with the name of the global the file asked for.

Importing :mod:`bpt_mm` installs :func:`load_local_checkpoint` as mmengine's
loader for local paths, so ``--resume``, ``load_from`` and ``tools/test.py``
work with any tool that imports ``bpt_mm`` (``custom_imports`` included).
"""
import argparse
import collections
import contextlib
import os
import os.path as osp
import pickle
import types
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from ..models.checkpoint import CheckpointError

__all__ = ['load_local_checkpoint', 'install_checkpoint_loader',
           'RESTRICTED_PICKLE', 'atomic_write_bytes', 'AtomicLocalBackend',
           'install_atomic_local_backend']


def _numpy_globals() -> dict:
    core = getattr(np, '_core', None) or np.core
    found = {('numpy', 'dtype'): np.dtype, ('numpy', 'ndarray'): np.ndarray}
    # numpy 2 pickles arrays through numpy._core, numpy 1 through numpy.core;
    # files written by either must load under the other.
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        for name in ('_reconstruct', 'scalar'):
            found[(module, name)] = getattr(core.multiarray, name)
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25
    for name in dir(dtypes) if dtypes is not None else ():
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            found[('numpy.dtypes', name)] = obj
    return found


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'Counter'): collections.Counter,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
    ('_codecs', 'encode'): __import__('codecs').encode,
    ('argparse', 'Namespace'): argparse.Namespace,
    ('mmengine.logging.history_buffer', 'HistoryBuffer'): HistoryBuffer,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
}
_ALLOWED.update(_numpy_globals())
# Python 2 pickles spell builtins as __builtin__.
_ALLOWED.update({('__builtin__', name): obj for (mod, name), obj in
                 list(_ALLOWED.items()) if mod == 'builtins'})

_HISTORY_BUFFER_METHODS = frozenset(
    name for name, value in vars(HistoryBuffer).items()
    if not name.startswith('_') and callable(value))


class _RefusedGlobal(pickle.UnpicklingError):
    """The file asks for something outside the allow-list (as opposed to
    a file that is not a valid pickle at all)."""


def _guarded_getattr(obj: Any, name: str) -> Any:
    """``getattr`` limited to what mmengine pickles: HistoryBuffer's
    statistics methods (``min``, ``mean``, ...), which it registers on the
    class and pickles by name."""
    is_buffer = obj is HistoryBuffer or isinstance(obj, HistoryBuffer)
    if is_buffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise _RefusedGlobal(
        f'refusing getattr({type(obj).__name__}, {name!r}): only the public '
        f'methods of mmengine HistoryBuffer may be looked up '
        f'({sorted(_HISTORY_BUFFER_METHODS)})')


class _RestrictedUnpickler(pickle.Unpickler):
    """Constructs only the allow-listed globals; see the module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ('builtins', '__builtin__') and name == 'getattr':
            return _guarded_getattr
        if module == 'torch._utils' and name.startswith('_rebuild_'):
            return getattr(torch._utils, name)
        if module == 'torch' and isinstance(getattr(torch, name, None),
                                            torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(
            f'the checkpoint asks for the global {module}.{name}, which is '
            f'neither a tensor, a container, a numpy array nor mmengine '
            f'training state; constructing it could run code from the file')


# torch.load(pickle_module=...) wants a module-like object with Unpickler,
# load and __name__.
RESTRICTED_PICKLE = types.ModuleType('bpt_mm_restricted_pickle')
RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
RESTRICTED_PICKLE.load = \
    lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()
RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError


def load_local_checkpoint(filename: str,
                          map_location: Optional[Union[str, Callable,
                                                       torch.device]] = None
                          ) -> Any:
    """Load a local checkpoint: weights only, or mmengine training state.

    Args:
        filename (str): Path of a file written by ``torch.save`` (``~`` is
            expanded).
        map_location: As for :func:`torch.load`.

    Returns:
        The unpickled object, usually a dict with ``state_dict``, ``meta``,
        ``message_hub``, ``optimizer`` and ``param_schedulers``.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file needs a global outside the allow-list (the
            message names it), or it is corrupt.

    Examples:
        >>> ckpt = load_local_checkpoint('work_dirs/x/iter_60.pth')
        >>> sorted(ckpt)
        ['message_hub', 'meta', 'optimizer', 'param_schedulers', 'state_dict']
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=True)
    except pickle.UnpicklingError:
        pass  # mmengine training state: try the wider, still closed, list
    except Exception as exc:  # noqa: BLE001 (truncated, empty, not torch)
        raise _corrupt(filename, exc) from exc
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=False,
                          pickle_module=RESTRICTED_PICKLE)
    except _RefusedGlobal as exc:
        raise CheckpointError(
            f'refusing to load {filename!r}: {exc}. If you trust the file, '
            f'convert it in a separate trusted step.') from exc
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(filename, exc) from exc


def _corrupt(filename: str, exc: BaseException) -> CheckpointError:
    """The error for a file torch cannot read at all: torch's own message
    (e.g. 'failed finding central directory', or a bare EOFError) names
    neither the file nor the likely cause."""
    size = osp.getsize(filename)
    return CheckpointError(
        f'cannot read checkpoint {filename!r} ({size} bytes): it is '
        f'truncated, corrupt or not a torch checkpoint '
        f'({type(exc).__name__}: {str(exc)[:200]}). If a run was killed '
        f'while writing it, resume from an earlier checkpoint.')


def atomic_write_bytes(data: bytes, path: Union[str, os.PathLike]) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either its old self or
    complete, never partly written.

    The bytes go to ``<path>.tmp-<pid>`` in the same directory (the same
    file system, so the rename is atomic), are flushed and fsynced, and the
    temporary file is then renamed over ``path``; the directory is fsynced
    so the rename survives a power cut. A process killed at any point
    leaves at most a ``.tmp-<pid>`` file beside an intact ``path``.
    """
    path = os.fspath(path)
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system allows it
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, with :func:`atomic_write_bytes` for
    ``put`` and ``put_text``.

    mmengine's ``save_checkpoint`` serialises a checkpoint to memory and
    hands the bytes to the backend of the path; the stock backend opens the
    final path and writes into it, so a job killed during a save leaves a
    file that has the final name but not the full content (and the next
    ``--resume`` would pick an earlier marker, or a later run would trip on
    the half file). ``CheckpointHook`` writes its ``last_checkpoint`` marker
    only after ``save_checkpoint`` returns, i.e. after the rename, so the
    marker never points at an incomplete file.
    """

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike],
                 encoding: str = 'utf-8') -> None:
        atomic_write_bytes(obj.encode(encoding), filepath)


def install_atomic_local_backend() -> None:
    """Make :class:`AtomicLocalBackend` mmengine's backend for local paths
    (the ``''`` prefix and ``backend='local'``). Idempotent.

    Backends are looked up per call by ``get_file_backend`` (no cached
    instance unless ``enable_singleton``), so every later checkpoint save
    uses it.
    """
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')


def install_checkpoint_loader() -> None:
    """Make :func:`load_local_checkpoint` mmengine's loader for local paths.

    Idempotent. URL and other schemes keep mmengine's loaders.
    """
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint,
                                     force=True)
