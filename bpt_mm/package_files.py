"""Where the configs and tools of this bpt_mm are, installed or not.

A built package (wheel, ``pip install .``) carries them as
``bpt_mm/.mim/configs`` and ``bpt_mm/.mim/tools`` (see ``setup.py``); a
checkout or an editable install has them beside the package, as
``configs/`` and ``tools/``.

mmengine 0.10 resolves ``pkg::path`` config names only for the OpenMMLab
packages it knows, not for bpt_mm: another project uses a shipped config
through its file path, which :func:`config_path` gives.
"""
import difflib
import os
import os.path as osp
from typing import List

_PACKAGE = osp.dirname(osp.abspath(__file__))


def package_folder(name: str) -> str:
    """The folder ``name`` (``'configs'`` or ``'tools'``) of this bpt_mm.

    Raises:
        FileNotFoundError: Neither ``bpt_mm/.mim/<name>`` nor a checkout's
            ``<name>/`` beside the package exists.
    """
    for folder in (osp.join(_PACKAGE, '.mim', name),
                   osp.join(osp.dirname(_PACKAGE), name)):
        if osp.isdir(folder):
            return folder
    raise FileNotFoundError(
        f'bpt_mm at {_PACKAGE!r} has no {name}/ folder (looked in .mim/'
        f'{name} inside the package and {name}/ beside it); reinstall '
        f'bpt_mm from a wheel or a checkout')


def _files(folder: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        found += [osp.relpath(osp.join(root, f), folder) for f in files
                  if f.endswith('.py')]
    return sorted(found)


def config_path(name: str) -> str:
    """Absolute path of a shipped config, e.g. ``'mask_rcnn_bpt.py'`` or
    ``'tiny/mask_rcnn_bpt_tiny.py'`` (relative to ``configs/``).

    Args:
        name (str): The config's path under ``configs/``; ``.py`` may be
            left out.

    Returns:
        str: A path for ``Config.fromfile`` or a config's ``_base_``.

    Raises:
        FileNotFoundError: No such config; the message lists close names.

    Examples:
        >>> import bpt_mm
        >>> from mmengine.config import Config
        >>> cfg = Config.fromfile(bpt_mm.config_path('mask_rcnn_bpt.py'))
        >>> cfg.model.backbone.type
        'PromptedViT'
    """
    folder = package_folder('configs')
    if not name.endswith('.py'):
        name += '.py'
    path = osp.join(folder, name)
    if osp.isfile(path):
        return path
    known = _files(folder)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    raise FileNotFoundError(
        f'bpt_mm has no config {name!r} in {folder!r}'
        + (f'; did you mean {close}?' if close else
           f'; configs are e.g. {known[:3]}'))
