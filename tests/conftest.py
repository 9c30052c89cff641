"""Fixtures shared by the end-to-end tests."""
import os.path as osp

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='session')
def tiny_workspace(tmp_path_factory):
    """A folder whose ``data/tiny`` holds the generated COCO and ADE20K
    sets, which the tiny configs name relative to the working directory.
    Made once per test session."""
    from bpt_mm.testing.tiny_data import ensure_tiny_data
    root = tmp_path_factory.mktemp('workspace')
    ensure_tiny_data(str(root / 'data' / 'tiny'))
    return root


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: tiny tensors gain nothing from
    threads, and on a loaded machine the pool makes them ~100x slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exact_fp32_matmul():
    """Plain fp32 CUDA matmuls and convolutions (no TF32) during a test:
    the device comparisons hold to 1e-5, which TF32's 10-bit mantissa would
    not. Harmless on the CPU."""
    import torch
    saved = (torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved
