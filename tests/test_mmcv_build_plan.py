"""tools/mmcv_build_plan.py: how set-up gets mmcv's ops on each machine."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'tools', 'mmcv_build_plan.py')
BASE = 'mmcv-2.1.0_torch-2.14.1_cp311_x86_64'


def _load_module():
    spec = importlib.util.spec_from_file_location('mmcv_build_plan', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plan_mod = _load_module()
Facts = plan_mod.BuildFacts


def decide(**facts):
    return plan_mod.decide(Facts(**facts), BASE)


# ---- no GPU: CPU ops, as before ----

@pytest.mark.parametrize('torch_cuda,nvcc', [(None, None), ('13.0', '13.0'),
                                             ('13.0', None), ('12.4', '13.0')])
def test_no_gpu_builds_cpu_ops_whatever_torch_and_nvcc(torch_cuda, nvcc):
    # This machine's case among them: a CUDA build of torch, nvcc 13.0, no
    # GPU. mmcv's setup.py then takes its CPU branch with FORCE_CUDA=0.
    plan = decide(torch_cuda=torch_cuda, nvcc_cuda=nvcc, jobs=2)
    assert (plan.action, plan.ops, plan.key) == ('build', 'cpu', BASE)
    assert plan.build_env == {'FORCE_CUDA': '0'}
    assert 'about 15 minutes with 2 compile jobs' in plan.message


def test_no_gpu_uses_the_cached_cpu_wheel():
    plan = decide(torch_cuda='13.0', cached_keys=frozenset({BASE}))
    assert (plan.action, plan.ops, plan.key) == ('use-cache', 'cpu', BASE)


def test_no_gpu_ignores_a_cached_cuda_wheel():
    plan = decide(cached_keys=frozenset({BASE + '_cu130_sm90'}))
    assert (plan.action, plan.ops, plan.key) == ('build', 'cpu', BASE)


# ---- a GPU: CUDA ops for its arch, or stop before compiling ----

def test_gpu_with_matching_nvcc_builds_cuda_ops_for_its_arch():
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='13.0', nvcc_path='/usr/local/cuda/bin/nvcc',
                  jobs=16)
    assert (plan.action, plan.ops) == ('build', 'cuda')
    assert plan.key == BASE + '_cu130_sm90'
    assert plan.build_env == {'FORCE_CUDA': '1',
                              'TORCH_CUDA_ARCH_LIST': '9.0'}
    # (30 + 58 files x 3 min) / 16 jobs: an estimate, and said to be one
    assert 'about 13 minutes with 16 compile jobs' in plan.message
    assert 'estimate' in plan.message


def test_gpu_uses_its_cached_cuda_wheel_without_nvcc():
    plan = decide(gpu_capabilities=('8.0', ), torch_cuda='13.0',
                  cached_keys=frozenset({BASE + '_cu130_sm80'}))
    assert (plan.action, plan.ops, plan.key) == ('use-cache', 'cuda',
                                                 BASE + '_cu130_sm80')


def test_gpu_never_takes_the_cpu_wheel_or_another_arch():
    cached = frozenset({BASE, BASE + '_cu130_sm80', BASE + '_cu124_sm90'})
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='13.0', nvcc_path='nvcc', cached_keys=cached)
    assert (plan.action, plan.key) == ('build', BASE + '_cu130_sm90')


def test_gpu_without_nvcc_stops_and_says_what_to_do():
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0')
    assert plan.action == 'stop'
    for needed in ('no nvcc', 'CUDA toolkit 13.0', 'CUDA_HOME',
                   'existing OpenMMLab environment', 'BPT_MM_MMCV_OPS=cpu',
                   'Nothing was compiled'):
        assert needed in plan.message


def test_gpu_with_nvcc_of_another_major_stops():
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='12.4', nvcc_path='/opt/cuda-12.4/bin/nvcc')
    assert plan.action == 'stop'
    assert '/opt/cuda-12.4/bin/nvcc is CUDA 12.4' in plan.message
    assert 'CUDA toolkit 13.0' in plan.message


def test_gpu_with_nvcc_of_another_minor_builds_and_says_so():
    # torch's BuildExtension only warns about a minor mismatch.
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='13.1', nvcc_path='nvcc')
    assert plan.action == 'build'
    assert 'nvcc 13.1' in plan.message and 'same major' in plan.message


def test_several_gpus_give_every_arch_once_in_order():
    plan = decide(gpu_capabilities=('9.0', '8.0', '9.0', '10.0'),
                  torch_cuda='13.0', nvcc_cuda='13.0', nvcc_path='nvcc')
    assert plan.build_env['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0;10.0'
    assert plan.key == BASE + '_cu130_sm80-sm90-sm100'


def test_user_arch_list_is_honoured_and_keyed():
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='13.0', nvcc_path='nvcc',
                  arch_list='8.0;9.0+PTX')
    assert plan.build_env['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0+PTX'
    assert plan.key == BASE + '_cu130_sm80-sm90ptx'


def test_cpu_ops_on_a_gpu_machine_hide_the_gpus_for_the_build():
    # mmcv's setup.py compiles CUDA ops whenever torch sees a GPU, whatever
    # FORCE_CUDA says: only hiding the GPUs gives a CPU build.
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  requested_ops='cpu')
    assert (plan.action, plan.ops, plan.key) == ('build', 'cpu', BASE)
    assert plan.build_env == {'FORCE_CUDA': '0', 'CUDA_VISIBLE_DEVICES': ''}
    assert 'cannot train on the GPU' in plan.message


def test_cuda_ops_without_a_gpu_need_an_arch_list():
    plan = decide(torch_cuda='13.0', nvcc_cuda='13.0', nvcc_path='nvcc',
                  requested_ops='cuda')
    assert plan.action == 'stop' and 'TORCH_CUDA_ARCH_LIST' in plan.message
    plan = decide(torch_cuda='13.0', nvcc_cuda='13.0', nvcc_path='nvcc',
                  requested_ops='cuda', arch_list='9.0')
    assert (plan.action, plan.key) == ('build', BASE + '_cu130_sm90')


def test_cuda_ops_with_a_cpu_torch_or_rocm_stop():
    plan = decide(requested_ops='cuda', arch_list='9.0')
    assert plan.action == 'stop' and 'CPU-only build' in plan.message
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda=None,
                  torch_hip='6.2')
    assert plan.action == 'stop' and 'ROCm' in plan.message


def test_unknown_ops_request_is_refused():
    with pytest.raises(ValueError, match='BPT_MM_MMCV_OPS'):
        decide(requested_ops='gpu')


def test_installed_cpu_ops_on_a_gpu_machine_are_warned_about():
    warn = plan_mod.installed_ops_warning
    assert 'cannot train on the GPU' in warn(True, 'not available')
    assert warn(True, '13.0') is None  # CUDA ops
    assert warn(False, 'not available') is None  # no GPU: CPU ops fit
    assert warn(True, 'not available', 'cpu') is None  # asked for


# ---- probes and the shell interface ----

def test_nvcc_release_is_read_from_its_banner():
    banner = ('nvcc: NVIDIA (R) Cuda compiler driver\n'
              'Cuda compilation tools, release 13.0, V13.0.88\n')
    assert plan_mod.nvcc_release(banner) == '13.0'
    assert plan_mod.nvcc_release('something else') is None


def test_cached_keys_are_folders_holding_a_wheel(tmp_path):
    (tmp_path / BASE).mkdir()
    (tmp_path / BASE / 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl').write_text(
        'x')
    (tmp_path / (BASE + '_cu130_sm90')).mkdir()  # a killed build: no wheel
    (tmp_path / (BASE + '_cu130_sm90') / '.partial.whl').write_text('x')
    assert plan_mod.cached_keys(str(tmp_path)) == {BASE}
    assert plan_mod.cached_keys(str(tmp_path / 'absent')) == frozenset()


def test_plan_survives_bash_eval():
    plan = plan_mod.BuildPlan('build', 'cpu', BASE,
                              "it's about 15 minutes; $HOME `x` \"q\"",
                              {'FORCE_CUDA': '0', 'CUDA_VISIBLE_DEVICES': ''})
    out = subprocess.run(
        ['bash', '-c', 'eval "$1"; printf "%s|%s|%s|%s" "$PLAN_MESSAGE" '
         '"$PLAN_CUDA_VISIBLE_DEVICES" "$PLAN_FORCE_CUDA" "$PLAN_KEY"', '_',
         plan_mod.plan_as_shell(plan)],
        capture_output=True, text=True, check=True)
    assert out.stdout == (f"it's about 15 minutes; $HOME `x` \"q\"||0|{BASE}")


def _run_cli(tmp_path, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, SCRIPT, '--base-key', BASE, '--cache-dir',
         str(tmp_path / 'wheels'), '--ops', env.get('BPT_MM_MMCV_OPS',
                                                   'auto')],
        capture_output=True, text=True, env=full_env, timeout=120)


def test_cli_on_a_machine_without_gpu_plans_cpu_ops(tmp_path):
    out = _run_cli(tmp_path, CUDA_VISIBLE_DEVICES='')
    assert out.returncode == 0, out.stderr
    assert f'PLAN_KEY={BASE}' in out.stdout
    assert 'PLAN_OPS=cpu' in out.stdout
    assert 'PLAN_FORCE_CUDA=0' in out.stdout


def test_cli_stops_on_an_nvcc_of_another_major(tmp_path):
    # A CUDA_HOME whose nvcc says 1.0: torch's CUDA, if any, is never 1.x.
    nvcc = tmp_path / 'cuda' / 'bin' / 'nvcc'
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text('#!/bin/sh\necho "Cuda compilation tools, release 1.0, '
                    'V1.0.0"\n')
    nvcc.chmod(0o755)
    out = _run_cli(tmp_path, CUDA_VISIBLE_DEVICES='', BPT_MM_MMCV_OPS='cuda',
                   TORCH_CUDA_ARCH_LIST='9.0',
                   CUDA_HOME=str(tmp_path / 'cuda'))
    assert out.returncode == 1
    assert out.stdout == ''
    import torch
    if torch.version.cuda is None:
        assert 'CPU-only build' in out.stderr
    else:
        assert f'{nvcc} is CUDA 1.0' in out.stderr


@pytest.mark.parametrize('arch_list,gpus,uncovered', [
    ('7.0', ('9.0', ), ('9.0', )),          # another major: no kernel
    ('8.6', ('8.0', ), ('8.0', )),          # a cubin needs minor >= its own
    ('9.0a', ('9.1', ), ('9.1', )),         # arch-specific: that arch only
    ('8.0', ('8.6', '9.0'), ('9.0', )),     # 8.0 cubin runs on 8.6 only
    ('8.0+PTX', ('8.6', '9.0'), ()),        # PTX is compiled for newer GPUs
    ('9.0 8.0', ('8.0', '9.0'), ()),        # spaces separate as ';' does
])
def test_user_arch_list_must_cover_the_local_gpus(arch_list, gpus,
                                                  uncovered):
    assert plan_mod.uncovered_gpus(gpus, arch_list) == uncovered
    plan = decide(gpu_capabilities=gpus, torch_cuda='13.0',
                  nvcc_cuda='13.0', nvcc_path='nvcc', arch_list=arch_list,
                  cached_keys=frozenset([BASE + '_cu130_sm70']))
    if uncovered:
        # stopped before an hour's build (or a cached wheel) whose ops
        # would fail on this GPU, naming the variable and the arch
        assert plan.action == 'stop'
        assert 'TORCH_CUDA_ARCH_LIST' in plan.message
        assert uncovered[-1] in plan.message
    else:
        assert plan.action == 'build'
        assert plan.build_env['TORCH_CUDA_ARCH_LIST'] == \
            ';'.join(arch_list.split())


def test_named_arch_list_is_left_to_torch_and_blank_list_is_unset():
    assert plan_mod.uncovered_gpus(('9.0', ), 'Ampere;Hopper') is None
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='13.0', nvcc_path='nvcc', arch_list='Hopper')
    assert plan.action == 'build'
    # only blanks: torch would fail on the empty entries mid-build, so the
    # local GPUs' arch is used and keyed
    plan = decide(gpu_capabilities=('9.0', ), torch_cuda='13.0',
                  nvcc_cuda='13.0', nvcc_path='nvcc', arch_list=' ; ')
    assert plan.action == 'build'
    assert plan.build_env['TORCH_CUDA_ARCH_LIST'] == '9.0'
    assert plan.key == BASE + '_cu130_sm90'


@pytest.mark.parametrize('ops,gpus', [('auto', ()), ('cpu', ('9.0', )),
                                      ('cpu', ()), ('auto', ('9.0', ))])
def test_rocm_torch_stops_whatever_ops_are_asked(ops, gpus):
    """mmcv's setup.py compiles HIP ops for any ROCm torch (with ROCm
    installed), visible GPU or not, FORCE_CUDA=0 or not: a 'CPU' plan would
    compile HIP ops and cache them under the CPU-only key."""
    plan = decide(gpu_capabilities=gpus, torch_hip='6.2', requested_ops=ops,
                  cached_keys=frozenset([BASE]))
    assert plan.action == 'stop'
    assert 'ROCm' in plan.message and 'HIP ops' in plan.message
    assert 'existing OpenMMLab environment' in plan.message
