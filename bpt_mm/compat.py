"""Version checks of the stack bpt_mm runs on, done at ``import bpt_mm``.

Versions are read from package metadata, so the check imports nothing heavy.
mmdet/mmseg are optional (a segmentation-only user needs no mmdet), but when
installed they must be in range; mmcv, when installed, must carry its compiled
ops, which mmdet's RoI heads and mmseg's models import.
"""
import importlib.metadata
import importlib.util
from typing import Dict, Optional, Tuple

from packaging.version import Version

#: package -> (minimum inclusive, maximum exclusive, required).
#: torch: the suite runs on 2.14.1 (requirements/torch.txt); 2.5 is the
#: first with the APIs bpt_mm calls (torch.serialization.safe_globals and
#: get_unsafe_globals_in_checkpoint), not run here. timm: 0.9.6 is the
#: lowest under which the backbone and attention tests pass (`make
#: test-min-timm`; 0.9.2 has no PatchEmbed(strict_img_size=...)); the suite
#: runs on 1.0.31. requirements/ declares the same ranges (checked by
#: tests/test_environment.py).
SUPPORTED: Dict[str, Tuple[str, str, bool]] = {
    'torch': ('2.5.0', '3.0.0', True),
    'mmengine': ('0.10.4', '0.11.0', True),
    'timm': ('0.9.6', '2.0.0', True),
    'mmcv': ('2.0.0', '2.2.0', False),
    'mmdet': ('3.3.0', '3.4.0', False),
    'mmsegmentation': ('1.2.2', '1.3.0', False),
}

FIX_HINT = ('Run `make test` or `bash tools/setup_env.sh` in the bpt_mm clone '
            'to set up a working environment, or install the versions named '
            'above (`pip install -r requirements/runtime.txt`; mmcv from '
            'requirements/mminstall.txt, built with its ops).')


def installed_version(package: str) -> Optional[str]:
    """Installed version of ``package`` from its metadata, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(versions: Dict[str, Optional[str]],
                   mmcv_has_ops: bool = True) -> None:
    """Raise ImportError if any package is missing or out of range.

    Args:
        versions: package name -> installed version (None if absent).
        mmcv_has_ops: whether mmcv's compiled extension ``mmcv._ext`` exists.
    """
    problems = []
    for package, (low, high, required) in SUPPORTED.items():
        version = versions.get(package)
        if version is None:
            if required:
                problems.append(f'{package} is not installed; bpt_mm needs '
                                f'{package}>={low},<{high}')
            continue
        parsed = Version(version.split('+')[0])
        if not Version(low) <= parsed < Version(high):
            problems.append(f'{package}=={version} is installed but bpt_mm '
                            f'needs {package}>={low},<{high}')
    if versions.get('mmcv') is not None and not mmcv_has_ops:
        problems.append('mmcv is installed without its compiled ops '
                        '(mmcv-lite or a build with MMCV_WITH_OPS=0); mmdet '
                        'and mmseg '
                        'need mmcv.ops')
    if problems:
        raise ImportError('bpt_mm cannot run on this environment:\n  - ' +
                          '\n  - '.join(problems) + '\n' + FIX_HINT)


def check_environment() -> None:
    """Check the installed packages (see :func:`check_versions`)."""
    versions = {name: installed_version(name) for name in SUPPORTED}
    has_ops = (versions['mmcv'] is None
               or importlib.util.find_spec('mmcv._ext') is not None)
    check_versions(versions, mmcv_has_ops=has_ops)
