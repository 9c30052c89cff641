"""tools/benchmark.py at a tiny size: what it reports, not how fast."""
import json
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'benchmark.py')


def test_benchmark_reports_ratios_to_full_finetuning(tmp_path):
    from bpt_mm.models import PromptedViT
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    try:
        from benchmark import VARIANTS
    finally:
        sys.path.pop(0)
    out = tmp_path / 'bench.json'
    names = ['full_finetune', 'bpt_bilinear_deep_top4']
    run = subprocess.run(
        [sys.executable, TOOL, '--arch', 'tiny', '--size', '32', '--steps',
         '1', '--warmup', '0', '--threads', '1', '--out', str(out),
         '--whitening-images', '2', '--variants', *names],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report['rows']
    assert report['whitening']['images'] == 2
    assert report['whitening']['seconds'] > 0
    assert 'Whitening (2 images at 32x32)' in run.stdout
    assert [r['variant'] for r in rows] == names
    full, bpt = rows
    assert full['train_step_ratio'] == full['peak_ratio'] == 1.0
    assert bpt['train_step_ratio'] == pytest.approx(
        bpt['train_step_s'] / full['train_step_s'])
    # the counts are those of the model the variant names
    for row in rows:
        model = PromptedViT(arch='tiny', **VARIANTS[row['variant']])
        assert row['trainable_params'] == sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        assert row['frozen_params_with_grad'] == 0
    assert bpt['trainable_params'] == 4 * 100 * 100 + 4 * 192 * 100
    assert '| bpt_bilinear_deep_top4 | 116,800 |' in run.stdout
    # The printed table shows the report's ratios of this variant, each to
    # full fine-tuning's row.
    row, = [line for line in run.stdout.splitlines()
            if line.startswith('| bpt_bilinear_deep_top4 |')]
    printed = [float(c.strip().rstrip('×')) for c in row.split('|')[1:-1]
               if c.strip().endswith('×')]
    assert printed == [round(bpt[k], 2) for k in (
        'train_step_ratio', 'peak_ratio', 'model_ratio', 'inference_ratio')]
    assert bpt['peak_ratio'] == pytest.approx(
        bpt['peak_mb'] / full['peak_mb'])


def table_rows(stdout):
    """``(variant, seconds, ratio)`` of each row of the printed table."""
    rows = [line.split('|')[1:-1] for line in stdout.splitlines()
            if line.startswith('| ') and 'variant' not in line]
    return [(r[0].strip(), float(r[1]), float(r[2].strip().rstrip('×')))
            for r in rows]


def assert_ratio_of_printed_times(seconds, reference, ratio):
    """``ratio`` is ``seconds / reference`` within the rounding of the
    three printed decimals (each value is off by at most 0.0005)."""
    low = max(seconds - 5e-4, 0) / (reference + 5e-4) - 5e-4
    high = (seconds + 5e-4) / max(reference - 5e-4, 1e-9) + 5e-4
    assert low <= ratio <= high, (seconds, reference, ratio)


@pytest.mark.parametrize('argv,message', [
    (['--variants', 'lora'], "unknown --variants ['lora']"),
    (['--size', '0'], '--size must be a positive int'),
    (['--whitening-images', '-1'], '--whitening-images must be >= 0'),
    (['--config', 'missing.py'], "--config: no such file 'missing.py'"),
])
def test_benchmark_refuses_bad_arguments(argv, message):
    run = subprocess.run([sys.executable, TOOL, *argv], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert message in run.stderr


def test_interleaved_inference_compares_against_the_unprompted_vit():
    run = subprocess.run(
        [sys.executable, TOOL, '--arch', 'tiny', '--infer-size', '32',
         '--steps', '1', '--threads', '1', '--interleaved-inference',
         '--variants', 'bpt_bilinear_deep', 'vpt_shallow'],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = table_rows(run.stdout)
    assert [r[0] for r in rows] == [
        'unprompted', 'bpt_bilinear_deep', 'vpt_shallow']
    reference = rows[0][1]
    for _, seconds, ratio in rows:
        assert_ratio_of_printed_times(seconds, reference, ratio)


def test_interleaved_train_compares_against_full_finetuning():
    run = subprocess.run(
        [sys.executable, TOOL, '--arch', 'tiny', '--size', '32', '--steps',
         '1', '--threads', '1', '--interleaved-train', '--variants',
         'bpt_bilinear_deep_top4'], capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = table_rows(run.stdout)
    assert [r[0] for r in rows] == ['full_finetune',
                                    'bpt_bilinear_deep_top4']
    reference = rows[0][1]
    for _, seconds, ratio in rows:
        assert_ratio_of_printed_times(seconds, reference, ratio)
