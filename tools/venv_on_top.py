"""Let a venv made on top of another environment see that environment's
packages, also when it is itself a venv.

``python -m venv --system-site-packages NEW`` gives NEW the packages of the
*base* interpreter (``sys.base_prefix``). When ``python`` belongs to a venv
(an OpenMMLab environment made with ``python -m venv``), that venv's own
site-packages (where its mmcv is) are not seen. Run with that venv's
interpreter, this script writes a ``.pth`` file into NEW that adds them with
``site.addsitedir`` (so their own ``.pth`` files are honoured too), after
NEW's own packages. For a conda environment or a system interpreter it
writes nothing: ``--system-site-packages`` already covers them.

Usage (tools/setup_env.sh):
    /path/to/env/bin/python tools/venv_on_top.py NEW_VENV_SITE_PACKAGES
"""
import os
import sys
import sysconfig
from typing import List, Optional, Sequence

PTH_NAME = 'bpt_mm_base_env.pth'


def own_site_dirs() -> List[str]:
    """This interpreter's venv site-packages (purelib, platlib), or [] when
    it is not a venv's."""
    if sys.prefix == sys.base_prefix:
        return []
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(paths[key] for key in ('purelib', 'platlib')))


def write_pth(target_site: str, site_dirs: Sequence[str]) -> Optional[str]:
    """Write the ``.pth`` into ``target_site``; returns its path, or None
    when there is nothing to add.

    Args:
        target_site: The new venv's site-packages.
        site_dirs: The folders to add (see :func:`own_site_dirs`).

    Raises:
        FileNotFoundError: ``target_site`` is not a folder.
    """
    if not os.path.isdir(target_site):
        raise FileNotFoundError(f'no site-packages folder {target_site!r} '
                                f'(is the new venv made?)')
    if not site_dirs:
        return None
    path = os.path.join(target_site, PTH_NAME)
    with open(path, 'w') as f:
        f.writelines(f'import site; site.addsitedir({d!r})\n'
                     for d in site_dirs)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = 'usage: python tools/venv_on_top.py NEW_VENV_SITE_PACKAGES'
    # Asked for help, not a folder named '--help' (every tool answers -h).
    if args in (['-h'], ['--help']):
        print(f'{usage}\n\n{__doc__}')
        return 0
    if len(args) != 1:
        print(usage, file=sys.stderr)
        return 2
    try:
        write_pth(args[0], own_site_dirs())
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
