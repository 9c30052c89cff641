"""Helpers shared by the test modules (no test module imports another).

Paths of the repository, the subprocess runner of the tools, the one
small-ViT factory and the checks of the attention shortcuts. The toy
mmengine model, data set and Runner live in ``tests/whitening_toy.py``.
"""
import glob
import importlib.util
import os
import os.path as osp
import re
import subprocess
import sys
import uuid
from types import ModuleType
from typing import Dict, List, Tuple

import pytest
import torch
from mmengine.config import Config

from bpt_mm.models import PromptedViT, attention

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(ROOT, 'tests')
TOOLS = osp.join(ROOT, 'tools')
# family ('mask_rcnn', 'upernet', ...) -> its tiny config
TINY = {osp.basename(p)[:-len('_bpt_tiny.py')]: p for p in sorted(
    glob.glob(osp.join(ROOT, 'configs', 'tiny', '*_bpt_tiny.py')))}
# A few iterations of a tiny config, evaluated and saved at the end.
SHORT = ['train_cfg.max_iters=4', 'train_cfg.val_interval=4',
         'default_hooks.checkpoint.interval=4']

# A small arch keeps the tests fast; d=32 is not a multiple of anything
# special, and 3 blocks let deep prompts start above block 0. 32x32 images
# with 8x8 patches give 16 patch tokens.
SMALL = dict(embed_dims=32, num_layers=3, num_heads=2, mlp_ratio=2.0)
IMG = 32

#: The devices a test runs on, for ``pytest.mark.parametrize('device',
#: DEVICES)``: the CUDA case is skipped (and counted) where CUDA is absent.
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA'))]


def small_vit(prompt=None, **kwargs) -> PromptedViT:
    """A PromptedViT of arch ``SMALL`` on 32x32 images with 8x8 patches.

    Args:
        prompt: the ``prompt`` option of PromptedViT (None: no prompts).
        **kwargs: other PromptedViT options; ``arch``, ``img_size`` and
            ``patch_size`` replace the small defaults.
    """
    kwargs.setdefault('arch', SMALL)
    kwargs.setdefault('img_size', IMG)
    kwargs.setdefault('patch_size', 8)
    return PromptedViT(prompt=prompt, **kwargs)


def run(cmd: List, cwd, threads: int = 2, expect: int = 0,
        timeout: float = 600, **env: str) -> str:
    """Run ``cmd`` with tests/ and the repository on PYTHONPATH; assert
    its exit status is ``expect``; return its stdout and stderr.

    Args:
        cmd: the command line (items are turned into strings).
        cwd: the working directory.
        threads: OMP_NUM_THREADS of the process.
        expect: the exit status it must end with.
        timeout: seconds before it is stopped.
        **env: further environment variables.
    """
    # CPU runs (gloo) on a GPU machine too: the GPUs are hidden.
    env.setdefault('CUDA_VISIBLE_DEVICES', '')
    full_env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                    PYTHONPATH=os.pathsep.join([TESTS, ROOT]), **env)
    out = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=full_env,
                         capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == expect, \
        f'exit {out.returncode} (expected {expect}):\n{text[-4000:]}'
    return text


def tool(name: str, *args: str) -> List[str]:
    """The command line running ``tools/<name>`` with ``args``.

    Args:
        name: the file name of the tool.
        *args: its arguments.
    """
    return [sys.executable, osp.join(TOOLS, name), *args]


def last_metrics(text: str, stage: str) -> Dict[str, float]:
    """``{metric: value}`` of the last ``Iter(stage)`` summary line.

    Args:
        text: a run's log.
        stage: ``'val'`` or ``'test'``.
    """
    lines = re.findall(rf'Iter\({stage}\) \[\d+/\d+\]\s+(.*)', text)
    assert lines, f'no Iter({stage}) line in:\n{text[-3000:]}'
    return {k: float(v) for k, v in
            re.findall(r'(\S+): (-?\d+\.\d+)', lines[-1])}


def write_config(tmp_path, base: str, edit, name: str = 'cfg.py'):
    """Dump ``base`` after ``edit(cfg)`` to a file the tools can run.

    Args:
        tmp_path: the folder to write into.
        base: the config file to start from.
        edit: a function changing the loaded Config in place.
        name: the file name to write.
    """
    cfg = Config.fromfile(base)
    edit(cfg)
    path = tmp_path / name
    cfg.dump(str(path))
    return path


def no_val(cfg: Config) -> None:
    """Remove the validation loop of ``cfg``.

    Args:
        cfg: the Config to change in place.
    """
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None


# ----------------------------------------------- attention shortcut checks
def count_calls(monkeypatch, name: str, module=attention) -> List[str]:
    """Record each call of ``module.name`` (still calling it).

    Args:
        monkeypatch: pytest's monkeypatch fixture (undoes the wrap).
        name: the function of ``module`` to count.
        module: the module holding it (default: bpt_mm.models.attention).
    """
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def assert_same_outputs_and_grads(got: torch.Tensor, expected: torch.Tensor,
                                  inputs) -> None:
    """``got`` equals ``expected`` to 1e-5, and so do the gradients of a
    random projection of each with respect to ``inputs``.

    Args:
        got: the output of the shortcut.
        expected: the output of the plain computation.
        inputs: the tensors both depend on.
    """
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad((got * weight).sum(), inputs),
                    torch.autograd.grad((expected * weight).sum(), inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def block_and_inputs(window: int, num_prefix: int,
                     device: str = 'cpu') -> Tuple:
    """Block 0 of a seeded small ViT and random inputs for it: ``(block,
    grid, prefix, patches, deep)`` on a 4x6 grid, 2 images.

    Args:
        window: the window size of the ViT (0: global attention).
        num_prefix: the number of prefix tokens (class token, prompts).
        device: where the block and the inputs are; they are drawn on the
            CPU, so every device gets the same values.
    """
    torch.manual_seed(0)
    model = small_vit(window_size=window).eval()
    block = model.blocks[0].to(device)
    grid = (4, 6)
    prefix = torch.randn(2, num_prefix, 32).to(device).requires_grad_()
    patches = torch.randn(2, grid[0] * grid[1], 32).to(device)
    deep = torch.randn(1, 3, 32).to(device).requires_grad_()
    return block, grid, prefix, patches, deep


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a fresh module, to call its ``main(argv)``
    in-process (a new module each call: no state carries over).

    Args:
        name: the tool's file name without ``.py``.
    """
    spec = importlib.util.spec_from_file_location(
        f'bpt_mm_tool_{name}_{uuid.uuid4().hex[:6]}',
        osp.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ whitening
def _previous_spectrum(sigma, eps):
    # The regularised spectrum as zca_whitening_matrix, condition_number
    # and effective_rank each computed it before they shared one
    # decomposition (restated here so the comparison cannot follow a
    # change of the library).
    s64 = sigma.detach().to(torch.float64)
    s64 = (s64 + s64.T) / 2
    dim = s64.shape[0]
    trace = float(torch.diagonal(s64).sum())
    evals, evecs = torch.linalg.eigh(s64)
    return evals.clamp_min(0) + eps * trace / dim, evecs


def previous_whitening(sigma, eps):
    """W, condition number and effective rank by three decompositions."""
    evals, evecs = _previous_spectrum(sigma, eps)
    w = (evecs * evals.rsqrt()) @ evecs.T
    w = ((w + w.T) / 2).to(torch.float32)
    evals, _ = _previous_spectrum(sigma, eps)
    cond = float(evals.max() / evals.min())
    evals, _ = _previous_spectrum(sigma, eps)
    dim = evals.numel()
    trace = float(torch.diagonal(sigma.detach().to(torch.float64)).sum())
    reg = eps * trace / dim
    noise = dim * torch.finfo(torch.float64).eps * float(evals.max())
    rank = int(((evals - reg) > max(reg, noise)).sum())
    return w, cond, rank
