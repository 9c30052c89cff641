"""Decide how tools/setup_env.sh gets mmcv's compiled ops on this machine.

Runs with the set-up venv's interpreter right after torch is installed and
before anything is compiled, so it imports nothing of bpt_mm (which is not
installed yet). It only decides; setup_env.sh does what it says.

Why a decision is needed: mmcv 2.1.0's ``setup.py`` compiles its CUDA ops
whenever ``torch.cuda.is_available()`` (or ``FORCE_CUDA=1``), whatever
``FORCE_CUDA=0`` says. On a GPU machine a plain build therefore needs an
``nvcc`` whose major version equals torch's CUDA (torch's
``BuildExtension`` refuses another major and only warns about another
minor), runs far longer than the CPU-only build, and its wheel must not be
cached under the CPU-only key. A CPU-only build on a GPU machine is only
obtained by hiding the GPUs from torch during the build
(``CUDA_VISIBLE_DEVICES=``).

Printed for bash (``eval "$(python tools/mmcv_build_plan.py ...)"``):
``PLAN_ACTION`` (``use-cache`` or ``build``), ``PLAN_OPS`` (``cpu`` or
``cuda``), ``PLAN_KEY`` (the cache folder's name), ``PLAN_FORCE_CUDA``,
``PLAN_CUDA_VISIBLE_DEVICES`` (``keep`` or a value to build under),
``PLAN_ARCH_LIST`` and ``PLAN_MESSAGE``. A plan that stops prints its
message on stderr and exits with status 1.

Usage:
    python tools/mmcv_build_plan.py \
        --base-key mmcv-2.1.0_torch-2.14.1_cp311_x86_64 \
        --cache-dir ~/.cache/bpt_mm/wheels [--ops auto|cpu|cuda] [--jobs 2]
    python tools/mmcv_build_plan.py --check-installed [--ops ...]
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Sequence, Tuple

OPS_CHOICES = ('auto', 'cpu', 'cuda')

# Measured on this project's 2-core machine: the CPU-only build of 77 C++
# files took 14.5 minutes wall with 2 jobs (26 CPU-minutes plus linking and
# packaging), so about 30 job-minutes.
CPU_BUILD_CPU_MINUTES = 30.0
# Not measured here: the CUDA build adds mmcv 2.1.0's 58 .cu files, each an
# nvcc compile for every listed arch; taken as about 3 CPU-minutes per file
# and arch, so the announcement is an order of magnitude, said as such.
CUDA_FILES = 58
CUDA_CPU_MINUTES_PER_FILE_AND_ARCH = 3.0


@dataclass(frozen=True)
class BuildFacts:
    """What the decision depends on, gathered by :func:`gather_facts`.

    Args:
        gpu_capabilities: Compute capabilities (``'9.0'``) of the GPUs torch
            sees; empty when ``torch.cuda.is_available()`` is false.
        torch_cuda: ``torch.version.cuda`` (``'13.0'``), None for a CPU
            build of torch.
        torch_hip: ``torch.version.hip``, None unless a ROCm build.
        nvcc_cuda: Release of the nvcc torch would use (``'13.0'``), None
            when there is none.
        nvcc_path: Where that nvcc is (for messages), None when absent.
        cached_keys: Names of cache folders that hold an mmcv wheel.
        requested_ops: ``BPT_MM_MMCV_OPS``: ``auto``, ``cpu`` or ``cuda``.
        arch_list: ``TORCH_CUDA_ARCH_LIST`` as the user set it, or None.
        jobs: Parallel compile jobs (``MAX_JOBS``).
    """
    gpu_capabilities: Tuple[str, ...] = ()
    torch_cuda: Optional[str] = None
    torch_hip: Optional[str] = None
    nvcc_cuda: Optional[str] = None
    nvcc_path: Optional[str] = None
    cached_keys: FrozenSet[str] = frozenset()
    requested_ops: str = 'auto'
    arch_list: Optional[str] = None
    jobs: int = 2


@dataclass(frozen=True)
class BuildPlan:
    """What setup_env.sh does about mmcv.

    Args:
        action: ``use-cache``, ``build`` or ``stop``.
        ops: ``cpu`` or ``cuda``: the kind of compiled ops.
        key: Cache folder name of the wheel (used or to be written).
        message: The announcement (``use-cache``/``build``) or the reason
            and what to do (``stop``).
        build_env: Environment variables for the mmcv compile. A value of
            None means "leave as it is".
    """
    action: str
    ops: str
    key: str
    message: str
    build_env: Dict[str, Optional[str]] = field(default_factory=dict)


def cache_key(base_key: str, ops: str, torch_cuda: Optional[str] = None,
              arch_list: str = '') -> str:
    """The cache folder name of an mmcv wheel.

    A CPU-only wheel keeps ``base_key`` (mmcv, torch, Python tag, machine);
    a CUDA wheel adds the CUDA version and the archs it was compiled for,
    so a wheel built for one GPU is never reused on another.

    Args:
        base_key: ``mmcv-<v>_torch-<v>_<pytag>_<machine>``.
        ops: ``cpu`` or ``cuda``.
        torch_cuda: torch's CUDA version (``'13.0'``), for ``cuda``.
        arch_list: ``TORCH_CUDA_ARCH_LIST`` (``'8.0;9.0'``), for ``cuda``.
    """
    if ops == 'cpu':
        return base_key
    cuda = 'cu' + (torch_cuda or 'unknown').replace('.', '')
    archs = _arch_entries(arch_list)
    # '9.0+PTX' also embeds PTX: another wheel, so another key (sm90ptx).
    sm = '-'.join('sm' + a.replace('.', '').replace('+', '').lower()
                  for a in archs if a)
    return f'{base_key}_{cuda}_{sm}'


def _arch_entries(arch_list: str) -> Tuple[str, ...]:
    """The entries of a ``TORCH_CUDA_ARCH_LIST``: torch splits on ``;`` and
    spaces alike."""
    return tuple(a for a in re.split(r'[;\s]+', arch_list.strip()) if a)


def uncovered_gpus(capabilities: Sequence[str],
                   arch_list: str) -> Optional[Tuple[str, ...]]:
    """The local GPUs whose kernels a wheel built for ``arch_list`` lacks.

    CUDA's compatibility rules: a cubin for ``X.Y`` runs on a GPU of the
    same major ``X`` and minor ``>= Y``; ``+PTX`` also embeds PTX that the
    driver compiles for any GPU of capability ``>= X.Y``; an arch-specific
    ``X.Ya`` cubin runs on ``X.Y`` only. A GPU none of them covers fails at
    its first mmcv op ("no kernel image is available for execution on the
    device"), after a build of an hour or more.

    Args:
        capabilities: The local GPUs' compute capabilities (``'9.0'``).
        arch_list: ``TORCH_CUDA_ARCH_LIST``.

    Returns:
        The uncovered capabilities (empty when every GPU is covered), or
        None when the list holds a named arch (``Ampere``) whose expansion
        is torch's to decide, so coverage is not judged here.
    """
    parsed = []
    for entry in _arch_entries(arch_list):
        found = re.fullmatch(r'(\d+)\.(\d+)(a?)(\+PTX)?', entry,
                             flags=re.IGNORECASE)
        if found is None:
            return None
        parsed.append((int(found.group(1)), int(found.group(2)),
                       bool(found.group(3)), bool(found.group(4))))

    def covered(cap: str) -> bool:
        major, minor = (int(p) for p in cap.split('.'))
        for a_major, a_minor, specific, ptx in parsed:
            if specific:
                if (a_major, a_minor) == (major, minor):
                    return True
            elif a_major == major and a_minor <= minor:
                return True
            if ptx and (a_major, a_minor) <= (major, minor):
                return True
        return False

    return tuple(cap for cap in dict.fromkeys(capabilities)
                 if not covered(cap))


def _major(version: str) -> str:
    return version.split('.')[0]


def _build_minutes(cpu_minutes: float, jobs: int) -> int:
    return max(1, round(cpu_minutes / max(1, jobs)))


def _cpu_plan(base_key: str, facts: BuildFacts, hide_gpus: bool,
              note: str = '') -> BuildPlan:
    build_env: Dict[str, Optional[str]] = {'FORCE_CUDA': '0'}
    if hide_gpus:
        # mmcv's setup.py builds CUDA ops whenever torch sees a GPU,
        # FORCE_CUDA=0 notwithstanding: hide them for the build only.
        build_env['CUDA_VISIBLE_DEVICES'] = ''
    if base_key in facts.cached_keys:
        return BuildPlan('use-cache', 'cpu', base_key,
                         f'using the cached mmcv wheel with CPU ops '
                         f'({base_key}){note}', build_env)
    minutes = _build_minutes(CPU_BUILD_CPU_MINUTES, facts.jobs)
    return BuildPlan(
        'build', 'cpu', base_key,
        f'compiling mmcv with its C++ ops for the CPU: about {minutes} '
        f'minutes with {facts.jobs} compile jobs (15 minutes measured with '
        f'2; once per machine){note}', build_env)


def _stop(key: str, message: str) -> BuildPlan:
    return BuildPlan('stop', 'cuda', key, message)


def _existing_env_hint() -> str:
    return ('or install bpt_mm into an existing OpenMMLab environment whose '
            'mmcv 2.x already has CUDA ops: PYTHON=/path/to/that/python make '
            'setup (the venv is made on top of it), or `pip install -e . '
            '--no-deps` inside it (docs/gpu.md)')


def decide(facts: BuildFacts, base_key: str) -> BuildPlan:
    """Choose how mmcv's ops are obtained on this machine.

    Args:
        facts: The machine, torch, nvcc, cache and user request.
        base_key: The CPU-only cache key (see :func:`cache_key`).

    Returns:
        The plan. ``stop`` plans name what to install or set instead.

    Raises:
        ValueError: ``facts.requested_ops`` is not one of
            :data:`OPS_CHOICES`.
    """
    if facts.requested_ops not in OPS_CHOICES:
        raise ValueError(f'BPT_MM_MMCV_OPS must be one of '
                         f'{list(OPS_CHOICES)}, got '
                         f'{facts.requested_ops!r}')
    has_gpu = bool(facts.gpu_capabilities)
    if facts.torch_hip is not None:
        # mmcv 2.1's setup.py compiles HIP ops for any ROCm torch once ROCm
        # is installed (`is_rocm_pytorch or torch.cuda.is_available() or
        # FORCE_CUDA`), whether a GPU is visible or not and whatever
        # FORCE_CUDA says: no plan of this set-up gives CPU ops there, and
        # a HIP wheel must not be cached under the CPU-only key.
        return _stop(base_key,
                     f'torch is a ROCm build (HIP {facts.torch_hip}): '
                     f"mmcv's setup.py compiles HIP ops for any ROCm torch "
                     f'(BPT_MM_MMCV_OPS={facts.requested_ops} and '
                     f'FORCE_CUDA=0 cannot stop it), which this set-up does '
                     f'not build or cache; use a CPU or CUDA build of torch '
                     f'(the set-up installs one into a fresh venv), '
                     + _existing_env_hint() + '. Nothing was compiled.')
    if facts.requested_ops == 'cpu' or (facts.requested_ops == 'auto'
                                         and not has_gpu):
        note = ''
        if has_gpu:
            note = ('; BPT_MM_MMCV_OPS=cpu on a GPU machine: mmcv ops such '
                    'as RoIAlign and nms will refuse CUDA tensors, so Mask '
                    'R-CNN and Cascade Mask R-CNN cannot train on the GPU '
                    'with this build')
        return _cpu_plan(base_key, facts, hide_gpus=has_gpu, note=note)

    # From here on: CUDA ops, because a GPU is visible or they were asked for.
    if facts.torch_cuda is None:
        return _stop(base_key,
                     'BPT_MM_MMCV_OPS=cuda, but the installed torch is a '
                     'CPU-only build (torch.version.cuda is None): install '
                     'a CUDA build of torch, or set BPT_MM_MMCV_OPS=auto')
    # A TORCH_CUDA_ARCH_LIST of only blanks and separators is no list
    # (torch would fail on its empty entries mid-build): taken as unset.
    user_archs = ';'.join(_arch_entries(facts.arch_list or ''))
    if user_archs:
        arch_list = user_archs
        missing = uncovered_gpus(facts.gpu_capabilities, arch_list)
        if missing:
            return _stop(
                cache_key(base_key, 'cuda', facts.torch_cuda, arch_list),
                f'TORCH_CUDA_ARCH_LIST={arch_list!r} has no kernels for '
                f'this machine\'s GPU arch {", ".join(missing)}: mmcv\'s '
                f'ops would fail on it with "no kernel image is available". '
                f'Add it (for example '
                f'TORCH_CUDA_ARCH_LIST="{arch_list};{missing[-1]}") or unset '
                f'TORCH_CUDA_ARCH_LIST to build for the local GPUs. Nothing '
                f'was compiled.')
    elif has_gpu:
        arch_list = ';'.join(sorted(set(facts.gpu_capabilities),
                                    key=lambda c: tuple(map(int,
                                                            c.split('.')))))
    else:
        return _stop(base_key,
                     'BPT_MM_MMCV_OPS=cuda on a machine where torch sees no '
                     'GPU: there is no GPU to take the arch from; set '
                     'TORCH_CUDA_ARCH_LIST (for example "8.0;9.0") for the '
                     'GPUs the wheel is meant for')
    key = cache_key(base_key, 'cuda', facts.torch_cuda, arch_list)
    build_env: Dict[str, Optional[str]] = {'FORCE_CUDA': '1',
                                           'TORCH_CUDA_ARCH_LIST': arch_list}
    if key in facts.cached_keys:
        return BuildPlan('use-cache', 'cuda', key,
                         f'using the cached mmcv wheel with CUDA '
                         f'{facts.torch_cuda} ops for arch {arch_list} '
                         f'({key})', build_env)
    why = ('a GPU is visible' if has_gpu else 'BPT_MM_MMCV_OPS=cuda')
    if facts.nvcc_cuda is None:
        return _stop(key,
                     f'{why} and torch is built for CUDA '
                     f'{facts.torch_cuda}, so mmcv must be compiled with '
                     f'CUDA ops, but no nvcc was found (looked in '
                     f'$CUDA_HOME/bin, on PATH and in /usr/local/cuda/bin, '
                     f'as torch does). Install the CUDA toolkit '
                     f'{facts.torch_cuda} (nvcc) and set '
                     f'CUDA_HOME=/path/to/cuda-{facts.torch_cuda}; '
                     + _existing_env_hint()
                     + '; or BPT_MM_MMCV_OPS=cpu for CPU-only ops (no GPU '
                     'detection training). Nothing was compiled.')
    if _major(facts.nvcc_cuda) != _major(facts.torch_cuda):
        return _stop(key,
                     f'{why} and torch is built for CUDA '
                     f'{facts.torch_cuda}, but the nvcc at '
                     f'{facts.nvcc_path} is CUDA {facts.nvcc_cuda}: torch '
                     f'refuses to compile extensions with another major '
                     f'CUDA version. Install the CUDA toolkit '
                     f'{facts.torch_cuda} and set CUDA_HOME to it; '
                     + _existing_env_hint()
                     + '; or BPT_MM_MMCV_OPS=cpu for CPU-only ops (no GPU '
                     'detection training). Nothing was compiled.')
    archs = len(_arch_entries(arch_list))
    minutes = _build_minutes(
        CPU_BUILD_CPU_MINUTES
        + CUDA_FILES * CUDA_CPU_MINUTES_PER_FILE_AND_ARCH * archs,
        facts.jobs)
    minor = ''
    if facts.nvcc_cuda != facts.torch_cuda:
        minor = (f' (nvcc {facts.nvcc_cuda} vs torch\'s CUDA '
                 f'{facts.torch_cuda}: same major version, which torch '
                 f'accepts with a warning)')
    return BuildPlan(
        'build', 'cuda', key,
        f'compiling mmcv with CUDA {facts.torch_cuda} ops for arch '
        f'{arch_list} with {facts.nvcc_path}{minor}: an estimate (not '
        f'measured here) of about {minutes} minutes with {facts.jobs} '
        f'compile jobs, once per machine; cached as {key}', build_env)


def installed_ops_warning(gpu_visible: bool, compiled_cuda: str,
                          requested_ops: str = 'auto') -> Optional[str]:
    """A warning when an mmcv that is already installed (an earlier set-up,
    an existing OpenMMLab environment) has CPU-only ops on a GPU machine.

    Args:
        gpu_visible: ``torch.cuda.is_available()``.
        compiled_cuda: ``mmcv.ops.get_compiling_cuda_version()``; a CPU-only
            build says ``'not available'``.
        requested_ops: ``BPT_MM_MMCV_OPS``; ``cpu`` asked for exactly this.

    Returns:
        The warning, or None when the ops fit the machine.
    """
    if not gpu_visible or requested_ops == 'cpu' \
            or compiled_cuda != 'not available':
        return None
    return ('WARNING: torch sees a GPU but the installed mmcv was compiled '
            'without CUDA ops: mmcv ops such as RoIAlign and nms will refuse '
            'CUDA tensors, so Mask R-CNN and Cascade Mask R-CNN cannot train '
            'on the GPU. To build CUDA ops: `pip uninstall mmcv` in that '
            'environment and run set-up again (or set BPT_MM_MMCV_OPS=cpu to '
            'keep CPU ops and silence this)')


def _nvcc_path() -> Optional[str]:
    """The nvcc torch's cpp_extension would use: $CUDA_HOME or $CUDA_PATH,
    else the one on PATH, else /usr/local/cuda."""
    home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    if home:
        candidate = os.path.join(home, 'bin', 'nvcc')
        return candidate if os.path.exists(candidate) else None
    on_path = shutil.which('nvcc')
    if on_path:
        return on_path
    candidate = '/usr/local/cuda/bin/nvcc'
    return candidate if os.path.exists(candidate) else None


def nvcc_release(version_output: str) -> Optional[str]:
    """The ``release X.Y`` in ``nvcc --version`` output, or None.

    Args:
        version_output: What ``nvcc --version`` printed.
    """
    found = re.search(r'release (\d+\.\d+)', version_output)
    return found.group(1) if found else None


def cached_keys(cache_dir: str) -> FrozenSet[str]:
    """Names of the folders under ``cache_dir`` that hold an mmcv wheel.

    Args:
        cache_dir: The wheel cache (``$BPT_MM_CACHE/wheels``).
    """
    if not os.path.isdir(cache_dir):
        return frozenset()
    return frozenset(
        name for name in os.listdir(cache_dir)
        if os.path.isdir(os.path.join(cache_dir, name)) and any(
            f.startswith('mmcv-') and f.endswith('.whl')
            for f in os.listdir(os.path.join(cache_dir, name))))


def gather_facts(cache_dir: str, requested_ops: str, jobs: int) -> BuildFacts:
    """Probe torch, the GPUs, nvcc and the cache on this machine.

    Args:
        cache_dir: The wheel cache (``$BPT_MM_CACHE/wheels``).
        requested_ops: ``BPT_MM_MMCV_OPS``.
        jobs: Parallel compile jobs.
    """
    import torch
    capabilities: Tuple[str, ...] = ()
    if torch.cuda.is_available():
        capabilities = tuple(
            '%d.%d' % torch.cuda.get_device_capability(i)
            for i in range(torch.cuda.device_count()))
    nvcc = _nvcc_path()
    release = None
    if nvcc is not None:
        try:
            release = nvcc_release(subprocess.run(
                [nvcc, '--version'], capture_output=True, text=True,
                timeout=60).stdout)
        except (OSError, subprocess.SubprocessError):
            release = None
    return BuildFacts(
        gpu_capabilities=capabilities, torch_cuda=torch.version.cuda,
        torch_hip=getattr(torch.version, 'hip', None), nvcc_cuda=release,
        nvcc_path=nvcc if release else None,
        cached_keys=cached_keys(cache_dir), requested_ops=requested_ops,
        arch_list=os.environ.get('TORCH_CUDA_ARCH_LIST') or None, jobs=jobs)


def plan_as_shell(plan: BuildPlan) -> str:
    """``NAME=value`` lines, shell-quoted, for bash's ``eval``.

    Args:
        plan: A plan whose action is not ``stop``.
    """
    visible = plan.build_env.get('CUDA_VISIBLE_DEVICES', None)
    values = {
        'PLAN_ACTION': plan.action,
        'PLAN_OPS': plan.ops,
        'PLAN_KEY': plan.key,
        'PLAN_FORCE_CUDA': plan.build_env.get('FORCE_CUDA') or '0',
        'PLAN_CUDA_VISIBLE_DEVICES': 'keep' if visible is None else visible,
        'PLAN_ARCH_LIST': plan.build_env.get('TORCH_CUDA_ARCH_LIST') or '',
        'PLAN_MESSAGE': plan.message,
    }
    return '\n'.join(f'{k}={shlex.quote(v)}' for k, v in values.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check-installed', action='store_true',
                        help='only warn (stderr) if the installed mmcv has '
                        'CPU-only ops while torch sees a GPU')
    parser.add_argument('--base-key', default=None,
                        help='CPU-only cache key: mmcv, torch, Python tag, '
                        'machine')
    parser.add_argument('--cache-dir', default=None,
                        help='the wheel cache folder')
    parser.add_argument('--ops', default='auto',
                        help=f'one of {list(OPS_CHOICES)} (BPT_MM_MMCV_OPS)')
    parser.add_argument('--jobs', type=int, default=2,
                        help='parallel compile jobs (MAX_JOBS)')
    args = parser.parse_args(argv)
    if args.ops not in OPS_CHOICES:
        print(f'BPT_MM_MMCV_OPS must be one of {list(OPS_CHOICES)}, got '
              f'{args.ops!r}', file=sys.stderr)
        return 2
    if args.check_installed:
        import mmcv.ops
        import torch
        warning = installed_ops_warning(
            torch.cuda.is_available(), mmcv.ops.get_compiling_cuda_version(),
            args.ops)
        if warning:
            print(warning, file=sys.stderr)
        return 0
    if not args.base_key or not args.cache_dir:
        parser.error('--base-key and --cache-dir are required to plan a '
                     'build')
    plan = decide(gather_facts(args.cache_dir, args.ops, args.jobs),
                  args.base_key)
    if plan.action == 'stop':
        print(plan.message, file=sys.stderr)
        return 1
    print(plan_as_shell(plan))
    return 0


if __name__ == '__main__':
    sys.exit(main())
