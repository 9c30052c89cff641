"""tools/gpu_check.sh without a GPU: its dry run shows exactly what it would
run, each command valid for its tool, and a real run refuses to start."""
import importlib.util
import os
import os.path as osp
import re
import shlex
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'tools', 'gpu_check.sh')


def _tool(name):
    spec = importlib.util.spec_from_file_location(
        f'bpt_mm_gpu_check_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *args, **env):
    return subprocess.run(
        ['bash', SCRIPT, '--out', str(tmp_path / 'out'), *args],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHON=sys.executable, **env))


def test_dry_run_lists_each_step_and_runs_nothing(tmp_path):
    out = _run(tmp_path, '--dry-run')
    assert out.returncode == 0, out.stderr
    steps = dict(re.findall(r'^\[gpu_check\] (\w+) \(limit \d+ s\): (.*)$',
                            out.stdout, flags=re.M))
    assert list(steps) == ['cuda_tests', 'tiny_data', 'mask_rcnn_amp',
                           'benchmark']
    commands = {name: shlex.split(line) for name, line in steps.items()}
    for argv in commands.values():
        assert argv[0] == sys.executable
    limits = [int(s) for s in re.findall(r'\(limit (\d+) s\)', out.stdout)]
    assert sum(limits) <= 8 * 60

    tests = commands['cuda_tests']
    assert tests[1:4] == ['-m', 'pytest', 'tests/test_cuda.py']
    for path in tests[3:]:
        if path.startswith('tests/'):
            # a file, or a test of it (file::name)
            file, _, name = path.partition('::')
            assert osp.isfile(osp.join(ROOT, file)), path
            if name:
                with open(osp.join(ROOT, file)) as f:
                    assert f'def {name}(' in f.read(), path

    train = commands['mask_rcnn_amp']
    args = _tool('train').parse_args(train[2:])
    assert args.amp and args.amp_dtype is None  # bf16 where the GPU has it
    assert osp.isfile(osp.join(ROOT, args.config))
    assert args.cfg_options['train_cfg.max_iters'] == 50
    assert args.cfg_options['train_cfg.val_interval'] == 50
    assert args.work_dir == str(tmp_path / 'out' / 'mask_rcnn_amp')

    benchmark = _tool('benchmark')
    bench = benchmark.parse_args(commands['benchmark'][2:])
    assert (bench.arch, bench.size) == ('base', 512)
    # the variants of the Performance table (docs/performance.md): every
    # built-in one
    assert bench.variants == list(benchmark.VARIANTS)
    assert bench.out == str(tmp_path / 'out' / 'benchmark.json')

    assert f"summary: {tmp_path / 'out' / 'summary.md'}" in out.stdout
    assert not (tmp_path / 'out').exists()


def test_without_cuda_it_refuses_before_running_anything(tmp_path):
    out = _run(tmp_path, CUDA_VISIBLE_DEVICES='')
    assert out.returncode == 2
    assert 'sees no CUDA GPU' in out.stderr and '--dry-run' in out.stderr
    assert not (tmp_path / 'out').exists()


def test_unknown_argument_is_refused(tmp_path):
    out = _run(tmp_path, '--amp')
    assert out.returncode == 2
    assert "unknown argument '--amp'" in out.stderr


def test_relative_out_and_python_are_taken_from_the_callers_folder(
        tmp_path):
    """``--out results`` run from another folder means that folder's
    ``results``, not one inside the clone; so does a relative PYTHON."""
    link = tmp_path / 'py'
    link.symlink_to(sys.executable)
    out = subprocess.run(
        ['bash', SCRIPT, '--dry-run', '--out', 'results'],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
        env=dict(os.environ, PYTHON='./py'))
    assert out.returncode == 0, out.stderr
    logs = re.findall(r'log: (.*)$', out.stdout, flags=re.M)
    assert logs and all(
        log.startswith(str(tmp_path / 'results') + '/') for log in logs)
    steps = re.findall(r'^\[gpu_check\] \w+ \(limit \d+ s\): (.*)$',
                       out.stdout, flags=re.M)
    assert steps and all(
        shlex.split(line)[0] == str(tmp_path) + '/./py' for line in steps)
    assert not osp.exists(osp.join(ROOT, 'results'))
