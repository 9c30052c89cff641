"""How mmengine reads and writes bpt_mm's checkpoints.

Importing :mod:`bpt_mm` installs three things into mmengine, so that
``--resume``, ``load_from``, ``tools/test.py`` and every checkpoint a
Runner saves are covered with any tool that imports ``bpt_mm``
(``custom_imports`` included):

- :func:`load_local_checkpoint` as the loader of local paths: torch's
  ``weights_only=True`` loader alone (through
  :func:`bpt_mm.safe_load.load_weights_only`), then
  :func:`~bpt_mm.engine.plain_state.from_plain`. mmengine 0.10 calls a bare
  ``torch.load``, which on torch >= 2.6 refuses mmengine's own checkpoints
  and on older torch runs any code a file holds. A checkpoint written
  without bpt_mm (plain mmdet/mmseg) is refused, naming the file and the
  globals torch reported, and saying how to convert it once
  (``tools/convert_checkpoint.py --trust``).
- :func:`save_plain_checkpoint` as the Runner's checkpoint writer: it
  applies :func:`~bpt_mm.engine.plain_state.to_plain` (HistoryBuffers,
  numpy values) after every ``before_save_checkpoint`` hook has run, then
  calls mmengine's own ``save_checkpoint``.
- :class:`AtomicLocalBackend` for local files: written to a temporary file
  and renamed, never half-written under the final name.
"""
import contextlib
import importlib
import io
import os
import os.path as osp
from typing import Any, Callable, Optional, Union

import torch
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.runner.checkpoint import CheckpointLoader

from ..safe_load import load_weights_only
from .plain_state import from_plain, to_plain

__all__ = ['load_local_checkpoint', 'install_checkpoint_loader',
           'save_plain_checkpoint', 'install_plain_checkpoint_saver',
           'write_checkpoint_file', 'atomic_write_bytes',
           'AtomicLocalBackend', 'install_atomic_local_backend']


def load_local_checkpoint(filename: str,
                          map_location: Optional[Union[str, Callable,
                                                       torch.device]] = None
                          ) -> Any:
    """Load a local checkpoint with ``torch.load(weights_only=True)``.

    Args:
        filename (str): Path of a file written by ``torch.save`` (``~`` is
            expanded).
        map_location: As for :func:`torch.load`.

    Returns:
        The checkpoint, usually a dict with ``state_dict``, ``meta``,
        ``message_hub``, ``optimizer`` and ``param_schedulers``, with
        HistoryBuffers and numpy values restored from their plain form.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is refused (it needs globals that the
            weights-only loader does not construct, is in the legacy
            format, declares absurd sizes, holds sparse tensors) or cannot
            be read; the message names the file and what to do.

    Examples:
        >>> import os.path as osp, tempfile, torch
        >>> path = osp.join(tempfile.mkdtemp(), 'iter_1.pth')
        >>> torch.save({'meta': {'iter': 1},
        ...             'state_dict': {'w': torch.ones(2)}}, path)
        >>> sorted(load_local_checkpoint(path))
        ['meta', 'state_dict']
    """
    filename = osp.expanduser(filename)
    checkpoint = load_weights_only(filename, what='checkpoint',
                                   map_location=map_location)
    return from_plain(checkpoint, filename)


def write_checkpoint_file(checkpoint: Any,
                          path: Union[str, os.PathLike]) -> None:
    """``torch.save`` the plain form of ``checkpoint`` to ``path``,
    atomically: what tools that write checkpoints themselves use
    (``merge_checkpoint.py``, ``convert_checkpoint.py``).

    Raises:
        TypeError: ``checkpoint`` holds a value that has no plain form.
    """
    buffer = io.BytesIO()
    torch.save(to_plain(checkpoint), buffer)
    atomic_write_bytes(buffer.getvalue(), path)


# The modules whose global `save_checkpoint` bpt_mm replaces (the Runner's
# own, and where it is defined).
_RUNNER_MODULE = importlib.import_module('mmengine.runner.runner')
_CHECKPOINT_MODULE = importlib.import_module('mmengine.runner.checkpoint')

#: mmengine's own save_checkpoint, kept before bpt_mm wraps it.
# (A re-import of this module finds the wrapper installed and takes what it
# wraps.)
_MMENGINE_SAVE_CHECKPOINT = getattr(_CHECKPOINT_MODULE.save_checkpoint,
                                    'bpt_mm_wraps',
                                    _CHECKPOINT_MODULE.save_checkpoint)


def save_plain_checkpoint(checkpoint: dict, filename: str, *args,
                          **kwargs) -> None:
    """mmengine's ``save_checkpoint`` applied to ``to_plain(checkpoint)``.

    Args:
        checkpoint (dict): What ``Runner.save_checkpoint`` built, after its
            ``before_save_checkpoint`` hooks.
        filename (str): Where to write; other arguments go to mmengine.

    Raises:
        TypeError: The checkpoint holds a value that has no plain form (the
            message says where); nothing is written then.
    """
    _MMENGINE_SAVE_CHECKPOINT(to_plain(checkpoint), filename, *args,
                              **kwargs)


save_plain_checkpoint.bpt_mm_wraps = _MMENGINE_SAVE_CHECKPOINT


def install_plain_checkpoint_saver() -> None:
    """Make :func:`save_plain_checkpoint` the function
    ``Runner.save_checkpoint`` calls. Idempotent.

    The Runner calls the ``save_checkpoint`` of its own module after its
    hooks, so that name is replaced there (and in
    ``mmengine.runner.checkpoint`` for direct callers that look it up at
    call time).
    """
    _RUNNER_MODULE.save_checkpoint = save_plain_checkpoint
    _CHECKPOINT_MODULE.save_checkpoint = save_plain_checkpoint


def atomic_write_bytes(data: bytes, path: Union[str, os.PathLike]) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either its old self or
    complete, never partly written.

    The bytes go to ``<path>.tmp-<pid>`` in the same directory (the same
    file system, so the rename is atomic), are flushed and fsynced, and the
    temporary file is then renamed over ``path``; the directory is fsynced
    so the rename survives a power cut. A process killed at any point
    leaves at most a ``.tmp-<pid>`` file beside an intact ``path``. A
    ``path`` that is a symbolic link is written through (its target is
    replaced; the link stays).
    """
    # Through a symbolic link, as mmengine's own backend writes: the rename
    # would otherwise replace the user's link by a file.
    path = osp.realpath(os.fspath(path))
    parent = osp.dirname(path)
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

    URLs, model-zoo names and mmengine file-backend names (``s3://``,
    ``petrel://``...) are turned into local files and read by this same
    loader; other prefixes (``pavi://``) are refused
    (:func:`bpt_mm.models.checkpoint_source.install_remote_loaders`,
    installed beside it). Idempotent.
    """
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint,
                                     force=True)
