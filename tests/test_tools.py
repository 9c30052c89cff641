"""tools/train.py, tools/test.py, the launchers and the checkpoint tools,
run as a user runs them: as subprocesses, on the tiny configs and the
generated data, on the CPU."""
import glob
import os
import os.path as osp
import pickle
import re
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from helpers import (SHORT, TINY, TOOLS, last_metrics, load_tool, no_val,
                     run, tool, write_config)

METRICS = dict(mmdet=('coco/bbox_mAP', 'coco/segm_mAP'),
               mmseg=('mIoU', 'aAcc'))


def test_every_family_has_a_tiny_config():
    assert set(TINY) == {'mask_rcnn', 'cascade_mask_rcnn', 'upernet'}


@pytest.mark.parametrize('family', sorted(TINY))
def test_tiny_config_trains_evaluates_and_tests(family, tiny_workspace,
                                                tmp_path):
    config = TINY[family]
    scope = Config.fromfile(config).default_scope
    work = tmp_path / 'work'
    text = run(tool('train.py', config, '--work-dir', work,
                    '--cfg-options', *SHORT), tiny_workspace)
    val = last_metrics(text, 'val')
    assert set(METRICS[scope]) <= set(val)
    assert all(0.0 <= val[k] <= 100.0 for k in METRICS[scope])
    ckpt = work / 'iter_4.pth'
    assert ckpt.is_file()

    # --show-dir relative: under the work dir, as mmdet and mmseg put it
    out = tmp_path / ('preds.pkl' if scope == 'mmdet' else 'preds')
    text = run(tool('test.py', config, ckpt, '--work-dir', tmp_path / 'test',
                    '--show-dir', 'show', '--out', out), tiny_workspace)
    test = last_metrics(text, 'test')
    # the same weights on the same images: the same numbers
    for key in METRICS[scope]:
        assert test[key] == val[key], key
    drawn = [f for f in glob.glob(str(tmp_path / 'test' / '**' / 'show' /
                                      '**' / '*'), recursive=True)
             if f.endswith(('.jpg', '.png'))]
    assert drawn, f'--show-dir show: no images under {tmp_path / "test"}'
    if scope == 'mmdet':  # --out: the predictions of the 8 images
        with open(out, 'rb') as f:
            assert len(pickle.load(f)) == 8
    else:  # one predicted mask per image of the 4
        assert len(glob.glob(str(out / '*.png'))) == 4
        # --tta: the config's multi-scale, flipped test-time augmentation
        text = run(tool('test.py', config, ckpt, '--work-dir',
                        tmp_path / 'tta', '--tta'), tiny_workspace)
        tta = last_metrics(text, 'test')
        assert all(0.0 <= tta[k] <= 100.0 for k in METRICS[scope])


def test_dist_train_two_processes_end_with_identical_weights(
        tiny_workspace, tmp_path):
    dump = tmp_path / 'dump'

    def edit(cfg):
        # prompts in two of the four blocks, the lower one's basis frozen:
        # parts of the backbone without gradients must not trip DDP
        cfg.model.backbone.prompt.update(
            depth='deep', layers=[2, 3], trainable_projection_layers=[3])
        cfg.custom_imports.imports.append('tool_hooks')
        cfg.custom_hooks.append(dict(type='DumpTrainableHook',
                                     out_dir=str(dump)))
        cfg.train_cfg.max_iters = 4
        cfg.default_hooks.checkpoint.interval = 4
        no_val(cfg)

    config = write_config(tmp_path, TINY['mask_rcnn'], edit)
    text = run(['bash', osp.join(TOOLS, 'dist_train.sh'), config, '2',
                '--work-dir', tmp_path / 'work'], tiny_workspace, threads=1,
               PYTHON=sys.executable, PORT='29517')
    assert "'backend': 'gloo'" in text or "backend='gloo'" in text
    ranks = [torch.load(dump / f'rank{r}.pth') for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1])
    assert any('.prompts.2.' in k for k in ranks[0])
    assert not any('.prompts.2.basis' in k for k in ranks[0])  # frozen
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    ckpt = tmp_path / 'work' / 'iter_4.pth'
    assert ckpt.is_file()

    # and the checkpoint is evaluated by two processes, each on half the set
    text = run(['bash', osp.join(TOOLS, 'dist_test.sh'), config, ckpt, '2',
                '--work-dir', tmp_path / 'test'], tiny_workspace, threads=1,
               PYTHON=sys.executable, PORT='29518')
    assert set(METRICS['mmdet']) <= set(last_metrics(text, 'test'))


def test_slurm_train_passes_its_settings_to_srun(tiny_workspace, tmp_path):
    """No Slurm here: a stand-in `srun` records its options and runs the
    task as one Slurm process would (SLURM_* variables, --launcher slurm)."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'srun').write_text(
        '#!/usr/bin/env bash\n'
        'echo "$@" > "$SRUN_LOG"\n'
        'while [ $# -gt 0 ]; do case "$1" in\n'
        '  -p) shift 2 ;; --*) shift ;; *) break ;; esac; done\n'
        'SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 '
        'MASTER_ADDR=127.0.0.1 MASTER_PORT=29519 exec "$@"\n')
    (fake / 'srun').chmod(0o755)
    log = tmp_path / 'srun.log'
    config = write_config(tmp_path, TINY['mask_rcnn'], lambda cfg: (
        cfg.train_cfg.update(max_iters=2), no_val(cfg),
        cfg.default_hooks.checkpoint.update(interval=2)))
    work = tmp_path / 'work'
    text = run(['bash', osp.join(TOOLS, 'slurm_train.sh'), 'gpu_part',
                'bpt_job', config, work], tiny_workspace, GPUS='1',
               GPUS_PER_NODE='1', CPUS_PER_TASK='2', SRUN_LOG=str(log),
               PYTHON=sys.executable,
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    srun_args = log.read_text().split()
    assert srun_args[:2] == ['-p', 'gpu_part']
    for option in ('--job-name=bpt_job', '--gres=gpu:1', '--ntasks=1',
                   '--ntasks-per-node=1', '--cpus-per-task=2'):
        assert option in srun_args, srun_args
    assert '--launcher=slurm' in srun_args
    assert "'backend': 'gloo'" in text or "backend='gloo'" in text
    assert (work / 'iter_2.pth').is_file()


def test_custom_imports_from_another_directory(tiny_workspace, tmp_path):
    """A user's own mmdet config, outside this repo, run the way mmdet's
    tools/train.py runs it: only custom_imports brings bpt_mm in."""
    own = tmp_path / 'my_project'
    own.mkdir()
    (own / 'my_vit_mask_rcnn.py').write_text(f'''
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['bpt_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='PromptedViT',
                  arch=dict(embed_dims=32, num_layers=2, num_heads=2),
                  img_size=64, patch_size=16,
                  prompt=dict(type='VPTPrompt', num_tokens=4)),
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=32,
              out_channels=32, num_outs=5),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32),
                  bbox_head=dict(in_channels=32, fc_out_channels=32,
                                 num_classes=3),
                  mask_roi_extractor=dict(out_channels=32),
                  mask_head=dict(in_channels=32, conv_out_channels=32,
                                 num_classes=3)))
data_root = {str(tiny_workspace / 'data' / 'tiny' / 'coco') + '/'!r}
train_dataloader = dict(batch_size=2, num_workers=0,
                        persistent_workers=False,
                        dataset=dict(data_root=data_root, metainfo=dict(
                            classes=('square', 'disk', 'triangle')),
                            pipeline=[
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(160, 128), keep_ratio=True),
    dict(type='PackDetInputs')]))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2)
val_dataloader = val_cfg = val_evaluator = None
test_dataloader = test_cfg = test_evaluator = None
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3))
param_scheduler = []
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2),
                     logger=dict(interval=1))
log_processor = dict(by_epoch=False)
''')
    code = ('from mmengine.config import Config\n'
            'from mmengine.runner import Runner\n'
            "cfg = Config.fromfile('my_vit_mask_rcnn.py')\n"
            "cfg.work_dir = 'work'\n"
            'Runner.from_cfg(cfg).train()\n')
    env = dict(os.environ, OMP_NUM_THREADS='2')
    env.pop('PYTHONPATH', None)  # nothing of this repo on the path
    out = subprocess.run([sys.executable, '-c', code], cwd=str(own),
                         env=env, capture_output=True, text=True,
                         timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert re.search(r'Iter\(train\) \[2/2\].*loss_mask', text)
    saved = torch.load(own / 'work' / 'iter_2.pth', weights_only=False)
    assert 'backbone.prompts.0.tokens' in saved['state_dict']


# ---------------------------------------------------------------- refusals
def test_tools_refuse_bad_invocations(tmp_path, monkeypatch):
    # the --amp refusal is the CPU machine's, on a GPU machine too
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    train, test = load_tool('train'), load_tool('test')
    config = TINY['mask_rcnn']
    bad_scope = tmp_path / 'bad_scope.py'
    bad_scope.write_text("default_scope = 'mmpretrain'\n")
    cases = [
        (train, [bad_scope], ValueError,
         r"`default_scope` of .* must be one of \['mmdet', 'mmseg'\]"),
        (train, [tmp_path / 'nope.py'], FileNotFoundError,
         'config file not found'),
        (train, [config, '--amp'], RuntimeError, '--amp needs a CUDA GPU'),
        (train, [config, '--resume', tmp_path / 'gone.pth'],
         FileNotFoundError, 'no checkpoint file'),
        (test, [config, tmp_path / 'gone.pth'], FileNotFoundError,
         'checkpoint file not found'),
    ]
    for module, argv, error, message in cases:
        with pytest.raises(error, match=message):
            module.main([str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([config, '--launcher', 'lsf'])
    assert exit_info.value.code == 2
    # the shell launchers check their arguments before starting anything
    for cmd, message in [
            (['bash', osp.join(TOOLS, 'dist_train.sh'), config, '0'],
             'GPUS must be a positive integer'),
            (['bash', osp.join(TOOLS, 'dist_test.sh'), config], 'usage:'),
            (['bash', osp.join(TOOLS, 'slurm_train.sh'), 'p'], 'usage:')]:
        text = run(cmd, tmp_path, expect=2, timeout=60)
        assert message in text, text


# ---------------------------------------------- trainable-only checkpoints
def save_tiny_backbone(config, path, seed):
    """A 'pretrained' file for the tiny config's ViT, in MAE's layout."""
    from bpt_mm.models import PromptedViT
    backbone = Config.fromfile(config).model.backbone
    torch.manual_seed(seed)
    vit = PromptedViT(arch=backbone.arch, img_size=backbone.img_size,
                      patch_size=backbone.patch_size)
    torch.save({'model': vit.state_dict()}, path)
    return path


def test_trainable_only_checkpoint_tests_merges_and_refuses(
        tiny_workspace, tmp_path):
    base = TINY['upernet']
    pretrained = save_tiny_backbone(base, tmp_path / 'vit.pth', seed=3)

    def with_backbone(path):
        def edit(cfg):
            cfg.model.backbone.init_cfg = None if path is None else dict(
                type='Pretrained', checkpoint=str(path))
            if path is not None:
                # without a backbone file, the config has no such hook:
                # tools/test.py must add the guard itself
                cfg.custom_hooks.append(dict(type='TrainableCheckpointHook'))
        return edit

    config = write_config(tmp_path, base, with_backbone(pretrained))
    work = tmp_path / 'work'
    text = run(tool('train.py', config, '--work-dir', work, '--cfg-options',
                    *SHORT), tiny_workspace)
    val = last_metrics(text, 'val')
    assert re.search(r'TrainableCheckpointHook: checkpoint weights '
                     r'[\d.]+ MiB instead of [\d.]+ MiB', text)
    small = work / 'iter_4.pth'
    state = torch.load(small, weights_only=True)['state_dict']
    assert not any(k.startswith('backbone.blocks.') for k in state)
    assert 'backbone.prompts.0.coefficients' in state
    assert any(k.startswith('decode_head.') for k in state)
    assert any(k.startswith('neck.') for k in state)

    # tools/test.py restores the backbone from init_cfg: the numbers of
    # the validation at the end of training come back
    text = run(tool('test.py', config, small, '--work-dir',
                    tmp_path / 't1'), tiny_workspace)
    assert 'restored' in text and 'frozen backbone tensors' in text
    assert last_metrics(text, 'test')['mIoU'] == val['mIoU']
    assert last_metrics(text, 'test')['aAcc'] == val['aAcc']

    # merged into one full checkpoint, it needs no pretrained file at all
    full = tmp_path / 'full.pth'
    text = run(tool('merge_checkpoint.py', config, small, full),
               tiny_workspace)
    assert re.search(r'merged \d+ backbone tensors', text)
    merged = torch.load(full, weights_only=True)['state_dict']
    assert set(state) < set(merged)
    assert any(k.startswith('backbone.blocks.') for k in merged)
    no_backbone = write_config(tmp_path, base, with_backbone(None),
                               'no_backbone.py')
    text = run(tool('test.py', no_backbone, full, '--work-dir',
                    tmp_path / 't2'), tiny_workspace)
    assert last_metrics(text, 'test')['aAcc'] == val['aAcc']

    # the small checkpoint with a config without a pretrained backbone:
    # completed from the file it recorded, whose fingerprint it checks ...
    text = run(tool('test.py', no_backbone, small, '--work-dir',
                    tmp_path / 't3'), tiny_workspace)
    assert last_metrics(text, 'test')['aAcc'] == val['aAcc']
    # ... and without that file: refused, never evaluated on a random one
    os.rename(pretrained, tmp_path / 'moved.pth')
    text = run(tool('test.py', no_backbone, small, '--work-dir',
                    tmp_path / 't3b'), tiny_workspace, expect=1)
    assert 'merge_checkpoint.py' in text and str(pretrained) in text
    os.rename(tmp_path / 'moved.pth', pretrained)
    # with another backbone: refused
    other = save_tiny_backbone(base, tmp_path / 'other.pth', seed=4)
    other_cfg = write_config(tmp_path, base, with_backbone(other),
                             'other.py')
    text = run(tool('test.py', other_cfg, small, '--work-dir',
                    tmp_path / 't4'), tiny_workspace, expect=1)
    assert 'is not the one this checkpoint was trained on' in text


TOOLS_WITH_HELP = sorted(
    name for name in os.listdir(TOOLS)
    if name.endswith('.py'))


@pytest.mark.parametrize('name', TOOLS_WITH_HELP)
def test_every_tool_answers_help_and_describes_each_option(name):
    proc = subprocess.run(
        [sys.executable, osp.join(TOOLS, name), '--help'], cwd=TOOLS,
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('usage:'), proc.stdout[:200]
    # argparse's options list: an option line whose help text neither
    # follows on the same line nor on the next (indented) one is bare.
    lines = proc.stdout.split('options:\n', 1)[-1].splitlines()
    bare = [line.strip() for line, after in zip(lines, lines[1:] + [''])
            if line.startswith('  -') and '  ' not in line.strip()
            and not after.startswith(' ' * 20)]
    assert not bare, f'tools/{name} --help: options without a description ' \
        f'{bare}'
