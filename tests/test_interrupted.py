"""Interrupted runs: a job killed with SIGKILL resumes exactly, a kill during
a checkpoint save never leaves a file that looks complete but is not, and
``--resume`` finds the newest complete checkpoint even when mmengine's
``last_checkpoint`` marker was cut short."""
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from mmengine.runner.checkpoint import _load_checkpoint

from bpt_mm.launch import latest_checkpoint, resolve_auto_resume
from helpers import ROOT, TESTS, TINY, no_val, run, tool, write_config
from whitening_toy import toy_runner

WHITENING_KEY = 'backbone.prompts.0.whitening'


def _sigkill_config(stall_at=None):
    """The tiny Mask R-CNN with BPT-fWhiten prompts (a frozen W, so the
    whitening must come through the kill unchanged), 6 iterations,
    a checkpoint every 2, deterministic."""
    def apply(cfg):
        cfg.model.backbone.prompt = dict(type='WhitenedPrompt', num_tokens=8)
        cfg.randomness = dict(seed=0, deterministic=True)
        cfg.train_cfg.max_iters = 6
        cfg.default_hooks.checkpoint.update(interval=2, max_keep_ckpts=-1)
        cfg.default_hooks.logger.interval = 1
        no_val(cfg)
        if stall_at:
            cfg.custom_imports.imports.append('tool_hooks')
            cfg.custom_hooks.append(dict(type='StallHook', at_iter=stall_at))
    return apply


def _popen(cmd, cwd, log_path):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    log = open(log_path, 'w')
    return subprocess.Popen([str(c) for c in cmd], cwd=str(cwd), env=env,
                            stdout=log, stderr=subprocess.STDOUT), log


def test_sigkill_after_first_checkpoint_resumes_exactly(tiny_workspace,
                                                        tmp_path):
    straight = write_config(tmp_path, TINY['mask_rcnn'], _sigkill_config(),
                            'straight.py')
    # The killed run stalls before its last iteration, so it is still
    # running whenever the kill comes: anywhere from just after the first
    # checkpoint to the stall, possibly in the middle of a later save.
    stalling = write_config(tmp_path, TINY['mask_rcnn'],
                            _sigkill_config(stall_at=6), 'stalling.py')
    a, b = tmp_path / 'a', tmp_path / 'b'
    # The uninterrupted run goes alongside the one that is killed.
    uninterrupted, log_a = _popen(
        tool('train.py', straight, '--work-dir', a), tiny_workspace,
        tmp_path / 'a.log')
    killed, log_b = _popen(tool('train.py', stalling, '--work-dir', b),
                           tiny_workspace, tmp_path / 'b.log')
    try:
        marker = b / 'last_checkpoint'
        deadline = time.monotonic() + 400
        while not (marker.is_file() and marker.read_text().strip()):
            assert killed.poll() is None, (tmp_path / 'b.log').read_text()
            assert time.monotonic() < deadline, 'no checkpoint in 400 s'
            time.sleep(0.05)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(60) == -signal.SIGKILL
        assert uninterrupted.wait(400) == 0, (tmp_path / 'a.log').read_text()
    finally:
        for proc in (killed, uninterrupted):
            if proc.poll() is None:
                proc.kill()
        log_a.close()
        log_b.close()

    saved = sorted(int(m.group(1)) for m in (
        re.match(r'iter_(\d+)\.pth$', p.name) for p in b.iterdir()) if m)
    assert saved and saved[0] == 2 and 6 not in saved, saved
    before = {n: _load_checkpoint(str(b / f'iter_{n}.pth'))  # all complete
              for n in saved}
    w_before = before[2]['state_dict'][WHITENING_KEY]
    assert not torch.equal(w_before, torch.eye(w_before.shape[0]))

    text = run(tool('train.py', straight, '--work-dir', b, '--resume'),
               tiny_workspace, threads=1)
    # At most one checkpoint interval lost: the newest complete checkpoint.
    assert f'resumed epoch: 0, iter: {saved[-1]}' in text
    assert 'BPTWhiteningHook: whitening matrices restored' in text
    assert 'computing whitening' not in text  # not recomputed
    assert 'random generator states restored' in text

    final_a = torch.load(a / 'iter_6.pth', weights_only=True)['state_dict']
    final_b = torch.load(b / 'iter_6.pth', weights_only=True)['state_dict']
    assert torch.equal(final_b[WHITENING_KEY], w_before)
    assert sorted(final_a) == sorted(final_b)
    for key, value in final_a.items():
        assert torch.equal(value, final_b[key]), key
    # training moved the prompts: the comparison is not of two inits
    assert not torch.equal(
        before[2]['state_dict']['backbone.prompts.0.tokens'],
        final_a['backbone.prompts.0.tokens'])


# A toy run (no mmdet): 2 iterations on 8 images, VPT prompts, a checkpoint
# each iteration.
KILLED_RUN = dict(prompt=dict(type='VPTPrompt', num_tokens=4), num_images=8,
                  max_iters=2, lr=0.1, seed=None, checkpoint_interval=1,
                  log_interval=None)
# That run, whose save of iter_2.pth is killed half-way: the writer's `open`
# writes half of what it is given, then SIGKILLs the process.
KILL_DURING_SAVE = '''
import builtins, os, signal, sys
from whitening_toy import toy_runner

real_open = builtins.open


class HalfThenDie:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def dying_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if 'iter_2' in str(file) and 'w' in mode:
        return HalfThenDie(f)
    return f


builtins.open = dying_open
toy_runner(sys.argv[1], **KILLED_RUN).train()
'''


def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    work = tmp_path / 'work'
    script = tmp_path / 'kill_during_save.py'
    script.write_text(f'KILLED_RUN = {KILLED_RUN!r}\n{KILL_DURING_SAVE}')
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    out = subprocess.run([sys.executable, str(script), str(work)],
                         env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    names = sorted(os.listdir(work))
    # It died writing iter_2: only a temporary file has those bytes ...
    assert any(n.startswith('iter_2.pth.tmp-') for n in names), names
    assert 'iter_2.pth' not in names, names
    # ... the previous checkpoint and the marker are intact.
    assert (work / 'last_checkpoint').read_text().strip() == \
        str(work / 'iter_1.pth')
    assert _load_checkpoint(str(work / 'iter_1.pth'))['meta']['iter'] == 1

    # and resuming continues from it
    runner = toy_runner(work, **KILLED_RUN, resume=True)
    runner.train()
    assert runner.iter == 2
    assert _load_checkpoint(str(work / 'iter_2.pth'))['meta']['iter'] == 2


def test_resume_skips_an_empty_or_stale_marker(tmp_path):
    for n in (2, 4):
        torch.save({'meta': {'iter': n}}, tmp_path / f'iter_{n}.pth')
    (tmp_path / 'iter_6.pth.tmp-123').write_bytes(b'half')  # a killed save
    marker = tmp_path / 'last_checkpoint'
    assert latest_checkpoint(str(tmp_path)) is None  # no marker: a new run
    marker.write_text(str(tmp_path / 'iter_2.pth'))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')
    for content in ('', str(tmp_path / 'iter_8.pth')):
        marker.write_text(content)  # cut short / names a deleted file
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert latest_checkpoint(str(tmp_path)) == \
                str(tmp_path / 'iter_4.pth')
        assert any('last_checkpoint' in str(w.message) for w in caught)


def test_auto_resume_without_a_checkpoint_keeps_the_configs_load_from(
        tmp_path):
    """``--resume`` (no path) on a job's first start: nothing to resume, so
    the config's ``load_from`` is the start (mmdet's --resume dropped it
    and the run trained without those weights); once a checkpoint exists,
    the run resumes from it."""
    from mmengine.config import Config
    start = str(tmp_path / 'coco_detector.pth')
    cfg = Config(dict(work_dir=str(tmp_path), load_from=start))
    line = resolve_auto_resume(cfg)
    assert cfg.load_from == start and cfg.resume is False
    assert f'load_from={start!r}' in line
    torch.save({'meta': {'iter': 2}}, tmp_path / 'iter_2.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    resolve_auto_resume(cfg)
    assert cfg.load_from == str(tmp_path / 'iter_2.pth') and cfg.resume
    empty = Config(dict(work_dir=str(tmp_path / 'new')))
    assert 'starts from iteration 0' in resolve_auto_resume(empty)
    assert empty.get('load_from') is None and empty.resume is False


@pytest.mark.parametrize('mode', ['nan', 'exit'])
def test_a_rank_failing_in_whitening_stops_the_job_naming_it(
        mode, tiny_workspace, tmp_path):
    """Two gloo processes under tools/dist_train.sh; rank 1 fails while
    whitening: its images are NaN (an exception), or it dies (os._exit).
    Rank 0, whose data is fine, must not wait for rank 1 in a collective:
    the job stops with rank 1 named."""
    def edit(cfg):
        cfg.custom_imports.imports.append('tool_hooks')
        cfg.custom_hooks.append(dict(type='PoisonWhiteningHook', rank=1,
                                     mode=mode))
        cfg.train_cfg.max_iters = 2
        no_val(cfg)

    config = write_config(tmp_path, TINY['mask_rcnn'], edit)
    # `run` fails the test on a hang (its timeout) and checks the status.
    text = run(['bash', os.path.join(ROOT, 'tools', 'dist_train.sh'), config,
                '2', '--work-dir', tmp_path / 'work'], tiny_workspace,
               threads=1, expect=1, timeout=300, PYTHON=sys.executable,
               PORT='29523' if mode == 'nan' else '29524')
    if mode == 'nan':
        # bpt_mm's own report, raised on both ranks (rank 0 learns of the
        # failure from the flag all-reduce that precedes the statistics)
        message = ('whitening failed on rank(s) [1] while collecting the '
                   'statistics of block 0')
        assert text.count(message) >= 2, text[-4000:]
        assert 'non-finite' in text
    else:
        # torchrun's report of the process that died; rank 0, blocked in
        # the flag all-reduce, is stopped by torchrun
        assert re.search(r'rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:'
                         r'\s*7', text), text[-4000:]
    # ... and nothing trained.
    assert 'Iter(train)' not in text
    assert not (tmp_path / 'work' / 'iter_2.pth').exists()
