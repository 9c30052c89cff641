"""The one way bpt_mm reads a torch file it did not just write itself.

Pretrained backbones, training checkpoints (``--resume``, ``load_from``,
``tools/test.py``, ``tools/merge_checkpoint.py``) and whitening files all go
through :func:`load_weights_only`:

1. **Before torch allocates anything**, the file's container is checked:
   only torch's zip format (``torch.save`` since torch 1.6) is read. Its
   central directory is read with :mod:`zipfile` (nothing decompressed), and
   the sizes its members declare must add up to at most
   :data:`MAX_ZIP_EXPANSION` times the file's size: ``torch.save`` stores
   members uncompressed, so only a crafted archive (a "zip bomb") declares
   more. The pickle itself may declare at most :data:`MAX_PICKLE_BYTES`.
   Anything that is not a zip archive is refused: torch reads it as its
   legacy format (torch < 1.6), allocating every storage at the size the
   pickle declares before reading its bytes, so a few hundred bytes can
   ask for gigabytes. (A bare pickle is refused naming the globals it
   names, found by parsing its opcodes, not by running them.)
2. The file is read by torch's own ``torch.load(weights_only=True)``, which
   builds tensors and plain containers only. A file that needs anything
   else (mmengine's ``HistoryBuffer``, numpy arrays, any class) is refused
   with the globals torch reported and how to proceed
   (``tools/convert_checkpoint.py --trust``).
3. What was loaded is walked once (shared objects once, at most
   :data:`MAX_DEPTH` levels): every tensor must be dense (``torch.strided``);
   sparse and other layouts are refused by their key, since no weight,
   optimizer state or whitening matrix of bpt_mm is sparse.

There is no home-made unpickler anywhere in bpt_mm: what a file can make
is what torch's weights-only unpickler makes.
"""
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, Callable, Iterable, List, Optional, Union

import torch

__all__ = ['CheckpointError', 'MAX_ZIP_EXPANSION', 'MAX_PICKLE_BYTES',
           'MAX_DEPTH',
           'CONVERT_HINT', 'check_torch_file', 'load_weights_only',
           'check_dense_tensors', 'describe_key']

#: Largest ratio of the sizes a zip checkpoint's members declare (added up)
#: to the size of the file. torch.save stores members uncompressed (ratio
#: about 1); a deflated archive of real weights shrinks by a few percent.
MAX_ZIP_EXPANSION = 4

#: Largest pickle (``data.pkl``) accepted in a zip checkpoint. The pickle
#: holds names and structure only, tensor bytes are separate members: a
#: ViT-B detector's is well under 1 MiB, while a small crafted pickle can
#: build objects far larger than itself.
MAX_PICKLE_BYTES = 64 * 2**20

#: Deepest nesting of containers accepted in a loaded file. mmengine's
#: training checkpoints nest about 6 levels (optimizer/state/<id>/exp_avg).
MAX_DEPTH = 64

#: How to proceed with a checkpoint torch's weights-only loader refuses.
CONVERT_HINT = ('If you trust the file (e.g. a checkpoint written by plain '
                'mmdet/mmseg/mmengine, without bpt_mm), convert it once: '
                '`python tools/convert_checkpoint.py --trust {path} '
                'OUT.pth`, which reads it with full unpickling (running any '
                'code it holds) and writes a copy that loads with '
                'weights_only=True; then use OUT.pth.')

# The first pickle of a legacy torch file: protocol 2, the long
# 0x1950a86a20f9469cfc6c (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, recognised or loaded into the model."""


def describe_key(path: Iterable[Any]) -> str:
    """``['a', 0, 'b']`` -> ``"['a'][0]['b']"``: where in a file a value is."""
    return ''.join(f'[{part!r}]' for part in path) or '(top level)'


def check_torch_file(path: str, what: str = 'checkpoint') -> None:
    """Refuse a file before torch reads it: missing, a directory, empty,
    the legacy format, not a zip archive, or a zip whose members declare
    more than :data:`MAX_ZIP_EXPANSION` times the file's size.

    Args:
        path (str): The file.
        what (str): What the file is meant to be, for messages
            (``'checkpoint'``, ``'whitening file'``...).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Any other refusal; the message names the file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'{what} file not found: {path!r}')
    if os.path.isdir(path):
        raise CheckpointError(f'{what} path {path!r} is a directory, not a '
                              f'file written by torch.save')
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f'cannot read {what} {path!r} (0 bytes): it '
                              f'is truncated, corrupt or not a torch '
                              f'checkpoint (the file is empty)')
    if not zipfile.is_zipfile(path):
        _refuse_non_zip(path, what, size)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f'cannot read {what} {path!r} ({size} bytes): it is truncated, '
            f'corrupt or not a torch checkpoint ({exc})') from exc
    names = [info.filename for info in members]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        # torch.save never writes a name twice; torch's reader and Python's
        # zipfile pick different copies of a repeated one, so what the
        # checks here see need not be what torch loads.
        raise CheckpointError(
            f'refusing to load {what} {path!r}: its zip archive holds '
            f'members of the same name more than once ({twice[:3]}); '
            f'torch.save never writes that, so it is crafted or damaged')
    pickles = [info for info in members
               if info.filename.endswith('data.pkl')
               and info.file_size > MAX_PICKLE_BYTES]
    if pickles:
        raise CheckpointError(
            f'refusing to load {what} {path!r}: its pickle '
            f'{pickles[0].filename!r} declares {pickles[0].file_size} bytes, '
            f'more than the limit of {MAX_PICKLE_BYTES} bytes (a checkpoint '
            f'keeps its tensor bytes outside the pickle)')
    declared = sum(info.file_size for info in members)
    limit = MAX_ZIP_EXPANSION * size
    if declared > limit:
        largest = max(members, key=lambda info: info.file_size)
        raise CheckpointError(
            f'refusing to load {what} {path!r}: its zip members declare '
            f'{declared} bytes uncompressed (the largest, '
            f'{largest.filename!r}, {largest.file_size} bytes stored in '
            f'{largest.compress_size}), more than {MAX_ZIP_EXPANSION} times '
            f'the file\'s {size} bytes (limit {limit} bytes); torch.save '
            f'writes members uncompressed, so this archive is crafted or '
            f'damaged')


def _pickle_globals(path: str) -> List[str]:
    """The globals the first pickle in ``path`` names, found by parsing its
    opcodes (:func:`pickletools.genops`), never by running them."""
    names = []
    try:
        with open(path, 'rb') as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ('GLOBAL', 'INST'):
                    names.append(str(arg).replace(' ', '.'))
                elif opcode.name == 'STACK_GLOBAL':
                    names.append('(a STACK_GLOBAL)')
    except Exception:  # noqa: BLE001 (a damaged pickle: report what we saw)
        pass
    return sorted(set(names))


def _refuse_non_zip(path: str, what: str, size: int) -> None:
    """Refuse a file that is not a zip archive, saying what it is.

    torch reads anything else as its legacy format, allocating every
    storage at the size the file declares before reading it, and however
    the file spells its header; so nothing but the zip format is passed
    to torch.
    """
    with open(path, 'rb') as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        raise CheckpointError(
            f'refusing to load {what} {path!r}: it is in torch\'s legacy '
            f'(before torch 1.6) format, which torch reads by allocating '
            f'every storage at the size the file declares before reading '
            f'it; bpt_mm reads only the zip format that torch.save has '
            f'written since 1.6. ' + CONVERT_HINT.format(path=path))
    if head[:1] == b'\x80':  # pickle's PROTO opcode
        names = _pickle_globals(path)
        needs = f', and it needs the globals {", ".join(names)}' \
            if names else ''
        raise CheckpointError(
            f'refusing to execute code from {what} {path!r}: it is a bare '
            f'pickle, not a torch checkpoint in zip format{needs}. '
            + CONVERT_HINT.format(path=path))
    raise CheckpointError(
        f'cannot read {what} {path!r} ({size} bytes): it is truncated, '
        f'corrupt or not a torch checkpoint (no zip archive found)')


def _refusal_reason(path: str, exc: BaseException,
                    allowed: Iterable[Any]) -> str:
    """Name what torch's weights-only unpickler refused: the globals the
    file needs (listed by torch without unpickling), or torch's reason
    (BUILD or SETITEM on something it does not build, an opcode), without
    torch's advice to retry with ``weights_only=False``."""
    text = str(exc)
    match = re.search(r'GLOBAL\s+(\S+)', text)
    if match:
        allowed_names = {f'{g.__module__}.{g.__qualname__}' for g in allowed}
        try:
            names = sorted(
                set(torch.serialization.get_unsafe_globals_in_checkpoint(
                    path)) - allowed_names)
        except Exception:  # noqa: BLE001 (best effort: torch named one)
            names = []
        names = names or [match.group(1)]
        if len(names) == 1:
            return f'it needs the global {names[0]}'
        return 'it needs the globals ' + ', '.join(names)
    match = re.search(r'WeightsUnpickler error:\s*([^\n]*)', text)
    if match:
        return f'torch reports: {match.group(1).strip()[:300]}'
    return f'torch reports: {type(exc).__name__}: {text.splitlines()[0][:200]}'


def check_dense_tensors(obj: Any, path: str, what: str = 'checkpoint'
                        ) -> None:
    """Refuse a loaded object holding a non-dense tensor or nested deeper
    than :data:`MAX_DEPTH`; visits each container once.

    Raises:
        CheckpointError: Naming the file and the key.
    """
    seen = set()
    stack: List[tuple] = [(obj, ())]
    while stack:
        value, key = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise CheckpointError(
                    f'refusing {what} {path!r}: {describe_key(key)} is a '
                    f'{value.layout} tensor of shape {tuple(value.shape)}; '
                    f'only dense (torch.strided) tensors are read')
            continue
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if len(key) >= MAX_DEPTH:
            raise CheckpointError(
                f'refusing {what} {path!r}: containers nested deeper than '
                f'{MAX_DEPTH} levels at {describe_key(key[:8])}...')
        if isinstance(value, dict):
            items = value.items()
        else:
            items = enumerate(value)
        for k, v in items:
            stack.append((v, key + (k, )))


def load_weights_only(path: Union[str, os.PathLike],
                      what: str = 'checkpoint',
                      map_location: Optional[Union[str, Callable,
                                                   torch.device]] = 'cpu',
                      extra_globals: Iterable[Any] = ()) -> Any:
    """Read a torch file with torch's weights-only unpickler, after the
    checks of :func:`check_torch_file` and before handing anything back,
    :func:`check_dense_tensors`.

    Args:
        path (str | PathLike): The file (``~`` is expanded).
        what (str): What the file is meant to be, for messages.
        map_location: As for :func:`torch.load`. Defaults to ``'cpu'``.
        extra_globals: Classes allowed on top of torch's weights-only set
            (torch's ``safe_globals``), e.g. ``argparse.Namespace``.

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Refused or unreadable; the message names the file
            and why, and for a refused global, how to proceed.

    Examples:
        >>> import os.path as osp, tempfile
        >>> path = osp.join(tempfile.mkdtemp(), 'vit.pth')
        >>> torch.save({'pos_embed': torch.zeros(1, 5, 8)}, path)
        >>> state = load_weights_only(path, what='pretrained checkpoint')
        >>> state['pos_embed'].shape
        torch.Size([1, 5, 8])
    """
    path = os.path.expanduser(os.fspath(path))
    check_torch_file(path, what)
    try:
        extra_globals = list(extra_globals)
        with torch.serialization.safe_globals(extra_globals):
            obj = torch.load(path, map_location=map_location,
                             weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler raises this for a global or an opcode
        # it will not run: the file wants code executed.
        raise CheckpointError(
            f'refusing to execute code from {what} {path!r}: '
            f'torch.load(weights_only=True) refused it '
            f'({_refusal_reason(path, exc, extra_globals)}). '
            + CONVERT_HINT.format(path=path)
        ) from exc
    except Exception as exc:  # noqa: BLE001
        # torch reports garbage in many shapes (RuntimeError from the zip
        # reader, a record-size mismatch, KeyError on a missing record):
        # all mean the same thing to the caller.
        raise CheckpointError(
            f'cannot read {what} {path!r} ({os.path.getsize(path)} bytes): '
            f'it is truncated, corrupt or not a torch checkpoint '
            f'({type(exc).__name__}: {str(exc)[:300]}). If a run was killed '
            f'while writing it, use an earlier checkpoint.') from exc
    check_dense_tensors(obj, path, what)
    return obj
