"""Crafted checkpoint files against every loader bpt_mm has.

Each crafted file is built here from pickle opcodes (or torch.save of an
odd tensor) and is only ever read by the code under test. For each family
(file write, object arrays, overlapping dtypes, BUILD on a class or a
function, legacy format, sparse tensors, huge declared sizes, zip bombs,
stride-0 position embeddings) the tests check that the file is refused
with a message naming it, that nothing is written outside the test's
temporary directory, that the process survives (loads that could crash
run in a subprocess) and that a trusted file read afterwards in the same
process is unchanged. The last part checks that checkpoints bpt_mm writes
(a Runner's, merge_checkpoint.py's, convert_checkpoint.py's) load with
``torch.load(weights_only=True)`` alone.
"""
import io
import json
import os
import os.path as osp
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner.checkpoint import CheckpointLoader

import bpt_mm  # noqa: F401  installs the loader and the plain saver
from bpt_mm.engine.checkpoint_io import (load_local_checkpoint,
                                         save_plain_checkpoint)
from bpt_mm.engine.plain_state import TAG, from_plain, to_plain
from bpt_mm.models.checkpoint import (MAX_TENSOR_FACTOR, CheckpointError,
                                      load_checkpoint_file, load_pretrained)
from bpt_mm.safe_load import MAX_ZIP_EXPANSION
from bpt_mm.whitening.io import load_whitening, save_whitening
from bpt_mm.whitening.options import WhiteningOptions
from helpers import ROOT, small_vit
from whitening_toy import toy_runner

ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, mlp_ratio=1.0)


# ------------------------------------------------------------ file makers
def const(value) -> bytes:
    """Opcodes that push ``value`` (protocol 2, no PROTO/STOP)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def glob(module: str, name: str) -> bytes:
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def pickled(*ops: bytes) -> bytes:
    return b'\x80\x02' + b''.join(ops) + b'.'


def zip_checkpoint(path, data_pkl: bytes, records=None,
                   method=zipfile.ZIP_STORED):
    """A file laid out like torch.save's zip format."""
    with zipfile.ZipFile(path, 'w', method) as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', 'little')
        archive.writestr('archive/version', '3\n')
        for name, data in (records or {}).items():
            archive.writestr(f'archive/data/{name}', data)
    return str(path)


def tensor_ops(numel: int, size, stride) -> bytes:
    """Opcodes of one float tensor over storage '0' declaring ``numel``."""
    storage = (b'(' + const('storage') + glob('torch', 'FloatStorage')
               + const('0') + const('cpu') + const(numel) + b'tQ')
    return (glob('torch._utils', '_rebuild_tensor_v2') + b'(' + storage
            + const(0) + const(tuple(size)) + const(tuple(stride))
            + const(False) + glob('collections', 'OrderedDict') + b')R'
            + b'tR')


def legacy_checkpoint(path, main_pkl: bytes, keys=(), magic_protocol=2):
    """torch's legacy (< 1.6) layout: magic, protocol, sys info, the main
    pickle, the storage keys (and no storage bytes). torch writes the magic
    number with protocol 2; it reads it in any spelling."""
    with open(path, 'wb') as f:
        f.write(pickle.dumps(torch.serialization.MAGIC_NUMBER,
                             protocol=magic_protocol))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps(dict(protocol_version=1001, little_endian=True,
                                  type_sizes=dict(short=2, int=4, long=4)),
                             protocol=2))
        f.write(main_pkl)
        f.write(pickle.dumps(list(keys), protocol=2))
    return str(path)


def numpy_array_ops(dtype_ops: bytes, raw: bytes) -> bytes:
    """An ndarray rebuilt the way numpy pickles one: _reconstruct, then
    BUILD with (version, shape, dtype, fortran, raw bytes)."""
    return (glob('numpy.core.multiarray', '_reconstruct')
            + b'(' + glob('numpy', 'ndarray') + const((0, )) + const(b'b')
            + b'tR' + b'(' + const(1) + const((2, )) + dtype_ops
            + const(False) + const(raw) + b'tb')


def dtype_ops(spec: str, state: tuple) -> bytes:
    return (glob('numpy', 'dtype') + b'(' + const(spec) + const(False)
            + const(True) + b'tR' + const(state) + b'b')


def crafted_files(tmp_path):
    """name -> path of each crafted file, and the path the file-write one
    targets (it must never appear)."""
    target = tmp_path / 'written_by_the_file'
    files = {}
    # Legacy format whose 'module' record carries a Namespace with the
    # attributes torch's legacy loader uses to write a .patch file.
    namespace = (glob('argparse', 'Namespace') + b')R'
                 + const({'__name__': str(target), 'dump_patches': True})
                 + b'b')
    files['file_write_legacy'] = legacy_checkpoint(
        tmp_path / 'file_write.pth',
        pickled(b'(' + const('module') + namespace + const('evil.py')
                + const('print(1)') + b'tQ'))
    # 2**31 floats declared in a few hundred bytes.
    files['huge_legacy'] = legacy_checkpoint(
        tmp_path / 'huge_legacy.pth',
        pickled(b'}' + const('w') + tensor_ops(2**31, (2**31, ), (1, ))
                + b's'), keys=['0'])
    files['huge_legacy_respelled'] = legacy_checkpoint(
        tmp_path / 'huge_legacy4.pth',
        pickled(b'}' + const('w') + tensor_ops(2**31, (2**31, ), (1, ))
                + b's'), keys=['0'], magic_protocol=4)
    files['huge_zip_record'] = zip_checkpoint(
        tmp_path / 'huge_record.pth',
        pickled(b'}' + const('w') + tensor_ops(2**31, (2**31, ), (1, ))
                + b's'), {'0': b'\0' * 16})
    files['object_array'] = zip_checkpoint(
        tmp_path / 'object_array.pth',
        pickled(b'}' + const('x') + numpy_array_ops(
            dtype_ops('O8', (3, '|', None, None, None, -1, -1, 63)),
            b'\x41' * 16) + b's'))
    overlapping = (3, '|', None, ('p', 'n'),
                   {'p': ('O8', 0), 'n': ('i8', 0)}, 8, 8, 63)
    files['overlapping_dtype'] = zip_checkpoint(
        tmp_path / 'overlapping_dtype.pth',
        pickled(b'}' + const('x') + numpy_array_ops(
            dtype_ops('V8', overlapping), b'\x41' * 16) + b's'))
    # BUILD that would set torch's tensor rebuild function's defaults, and
    # BUILD / SETITEM on allowed classes.
    files['build_on_function'] = zip_checkpoint(
        tmp_path / 'build_function.pth',
        pickled(glob('torch._utils', '_rebuild_tensor_v2')
                + const({'__defaults__': (True, )}) + b'b'))
    files['build_on_class'] = zip_checkpoint(
        tmp_path / 'build_class.pth',
        pickled(glob('argparse', 'Namespace')
                + const({'__init__': 1}) + b'b'))
    files['setitem_on_class'] = zip_checkpoint(
        tmp_path / 'setitem_class.pth',
        pickled(glob('collections', 'OrderedDict') + const('fromkeys')
                + const(1) + b's'))
    files['code'] = zip_checkpoint(
        tmp_path / 'code.pth',
        pickled(glob('os', 'system') + const((f'touch {target}', )) + b'R'))
    # A deflated member that expands 1024 times.
    files['zip_bomb'] = zip_checkpoint(
        tmp_path / 'zip_bomb.pth',
        pickled(b'}' + const('w') + tensor_ops(2**22, (2**22, ), (1, ))
                + b's'), {'0': b'\0' * 2**24}, method=zipfile.ZIP_DEFLATED)
    # A pickle whose central-directory entry declares 1 GiB.
    files['huge_pickle'] = declare_size(zip_checkpoint(
        tmp_path / 'huge_pickle.pth', pickled(const('x'))),
        'archive/data.pkl', 2**30)
    return files, target


def declare_size(path, member: str, size: int):
    """Rewrite the uncompressed size that the zip's central directory
    declares for ``member`` (what a reader allocates for it)."""
    data = bytearray(open(path, 'rb').read())
    start = data.index(b'PK\x01\x02')
    while True:  # central directory headers, one per member
        name_len = int.from_bytes(data[start + 28:start + 30], 'little')
        name = bytes(data[start + 46:start + 46 + name_len]).decode()
        if name == member:
            data[start + 24:start + 28] = size.to_bytes(4, 'little')
            break
        start = data.index(b'PK\x01\x02', start + 4)
    open(path, 'wb').write(bytes(data))
    return path


# ------------------------------------------------------ trusted reference
@pytest.fixture
def trusted(tmp_path):
    """A trusted pretrained file and a trusted training checkpoint written
    before any crafted file is read, and a check that both read back as
    written (and that torch's and mmengine's globals are untouched)."""
    torch.manual_seed(0)
    weights = small_vit(arch=ARCH).state_dict()
    pretrained = str(tmp_path / 'trusted_vit.pth')
    torch.save({'model': weights}, pretrained)
    buffer = HistoryBuffer()
    for value in (1.0, 2.0, 6.0):
        buffer.update(value)
    training = str(tmp_path / 'trusted_iter_3.pth')
    save_plain_checkpoint(
        dict(meta=dict(iter=3), state_dict={'w': torch.arange(4.)},
             message_hub=dict(log_scalars={'train/loss': buffer})),
        training)
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    statistics = dict(HistoryBuffer._statistics_methods)

    def check():
        loaded = load_checkpoint_file(pretrained)['model']
        assert loaded.keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(loaded[key], value), key
        ckpt = CheckpointLoader.load_checkpoint(training, map_location='cpu')
        assert torch.equal(ckpt['state_dict']['w'], torch.arange(4.))
        restored = ckpt['message_hub']['log_scalars']['train/loss']
        assert restored.mean() == pytest.approx(3.0)
        assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults
        assert HistoryBuffer._statistics_methods == statistics

    return check


def whitened_vit():
    return small_vit(dict(type='WhitenedPrompt', num_tokens=3,
                          allow_identity_whitening=True), arch=ARCH)


LOADERS = {
    'pretrained': load_checkpoint_file,
    'training': lambda path: CheckpointLoader.load_checkpoint(
        path, map_location='cpu'),
    'whitening': lambda path: load_whitening(path, whitened_vit()),
}
IN_PROCESS = ('file_write_legacy', 'huge_legacy', 'huge_legacy_respelled',
              'huge_zip_record',
              'build_on_function', 'build_on_class', 'setitem_on_class',
              'code', 'zip_bomb', 'huge_pickle')


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_crafted_files_are_refused_by_name(tmp_path, monkeypatch, trusted,
                                           loader):
    files, target = crafted_files(tmp_path)
    cwd = tmp_path / 'cwd'  # the legacy file-write would land here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name in IN_PROCESS:
        path = files[name]
        error = ValueError if loader == 'whitening' else CheckpointError
        with pytest.raises(error) as err:
            LOADERS[loader](path)
        assert path in str(err.value), name
    assert not target.exists()
    assert list(cwd.iterdir()) == []
    trusted()


def test_refusals_say_why_and_how_to_proceed(tmp_path):
    files, _ = crafted_files(tmp_path)
    messages = {}
    for name, path in files.items():
        if name in IN_PROCESS:
            with pytest.raises(CheckpointError) as err:
                load_checkpoint_file(path)
            messages[name] = str(err.value)
    assert 'legacy' in messages['file_write_legacy']
    assert 'legacy' in messages['huge_legacy']
    assert 'convert_checkpoint.py --trust' in messages['huge_legacy']
    assert 'bare pickle' in messages['huge_legacy_respelled']
    assert 'does not match expected size' in messages['huge_zip_record']
    assert "got <class 'function'>" in messages['build_on_function']
    assert "got <class 'type'>" in messages['build_on_class']
    assert 'SETITEM' in messages['setitem_on_class']
    assert 'system' in messages['code']
    assert 'convert_checkpoint.py --trust' in messages['code']
    assert "'archive/data.pkl' declares" in messages['huge_pickle']
    bomb = messages['zip_bomb']
    assert 'archive/data/0' in bomb and f'more than {MAX_ZIP_EXPANSION} ' \
        'times' in bomb


def test_legacy_and_zip_bomb_are_refused_before_torch_reads(tmp_path,
                                                            monkeypatch):
    files, _ = crafted_files(tmp_path)
    calls = []
    monkeypatch.setattr(torch, 'load', lambda *a, **k: calls.append(a))
    for name in ('huge_legacy', 'huge_legacy_respelled',
                 'file_write_legacy', 'zip_bomb', 'huge_pickle'):
        with pytest.raises(CheckpointError):
            load_local_checkpoint(files[name])
    assert calls == []  # nothing allocated at the sizes the files declare


_SUBPROCESS_LOAD = r'''
import json, sys
import bpt_mm
from bpt_mm.models.checkpoint import CheckpointError, load_checkpoint_file
from mmengine.runner.checkpoint import CheckpointLoader
results = {}
for path in sys.argv[1:]:
    for loader in ('pretrained', 'training'):
        try:
            if loader == 'pretrained':
                load_checkpoint_file(path)
            else:
                CheckpointLoader.load_checkpoint(path, map_location='cpu')
            results[f'{path}|{loader}'] = 'LOADED'
        except CheckpointError as exc:
            results[f'{path}|{loader}'] = str(exc)
print(json.dumps(results))
'''


def test_arrays_that_could_crash_are_refused_in_a_subprocess(tmp_path):
    files, _ = crafted_files(tmp_path)
    paths = [files['object_array'], files['overlapping_dtype']]
    proc = subprocess.run(
        [sys.executable, '-c', _SUBPROCESS_LOAD, *paths], cwd=str(tmp_path),
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
            [ROOT, os.environ.get('PYTHONPATH', '')])))
    assert proc.returncode == 0, proc.stderr[-2000:]  # no crash, no signal
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for key, message in results.items():
        path = key.split('|')[0]
        assert path in message and 'numpy' in message, (key, message)


def test_sparse_tensors_are_refused_by_key(tmp_path, trusted):
    valid = torch.sparse_coo_tensor(torch.tensor([[0, 1]]),
                                    torch.ones(2), (4, ))
    # Indices past the end: torch validates them on a weights-only load;
    # either way the file is refused, and nothing densifies it.
    invalid = torch.sparse_coo_tensor(torch.tensor([[0, 10**9]]),
                                      torch.ones(2), (4, ),
                                      check_invariants=False)
    for name, tensor in (('valid', valid), ('invalid', invalid)):
        path = str(tmp_path / f'sparse_{name}.pth')
        torch.save({'state_dict': {'pos_embed': tensor}}, path)
        for loader in ('pretrained', 'training'):
            with pytest.raises(CheckpointError) as err:
                LOADERS[loader](path)
            assert path in str(err.value)
            if name == 'valid':
                assert "['state_dict']['pos_embed'] is a torch.sparse_coo" \
                    in str(err.value)
    trusted()


def test_stride0_pos_embed_of_a_huge_grid_is_refused_before_resampling(
        tmp_path, trusted):
    vit = small_vit(arch=ARCH)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    side = 1000  # 10**6 positions in 4 bytes of storage
    state['pos_embed'] = torch.zeros(1).expand(1, 1 + side * side, 32)
    path = str(tmp_path / 'stride0.pth')
    torch.save(state, path)
    assert osp.getsize(path) < 200_000
    with pytest.raises(CheckpointError) as err:
        load_pretrained(vit, path)
    msg = str(err.value)
    assert path in msg and "'pos_embed'" in msg
    assert f'(1, {1 + side * side}, 32)' in msg and (
        f'more than {MAX_TENSOR_FACTOR} times' in msg)
    trusted()


def test_a_larger_but_reasonable_pos_embed_still_loads(tmp_path):
    source = small_vit(arch=ARCH, img_size=64)  # 8x8 grid
    path = str(tmp_path / 'vit64.pth')
    torch.save(source.state_dict(), path)
    target = small_vit(arch=ARCH)  # 4x4
    info = load_pretrained(target, path)
    assert info['pos_embed_resized'] == ((8, 8), (4, 4))


# ------------------------------------------------------- whitening types
def whitening_file(tmp_path):
    vit = whitened_vit()
    path = str(tmp_path / 'whitening.pth')
    save_whitening(path, {0: dict(whitening=torch.eye(32), sigma=torch.eye(
        32, dtype=torch.float64), num_tokens=64, num_images=4,
        condition_number=1.0)}, vit, WhiteningOptions())
    return vit, path


@pytest.mark.parametrize('case, edit, words', [
    ('version-tensor', lambda p: p.update(version=torch.tensor(1)),
     ['`version`', 'int', 'tensor']),
    ('version-string', lambda p: p.update(version='1'),
     ['`version`', "'1'"]),
    ('embed-dims-tensor', lambda p: p.update(embed_dims=torch.tensor(32)),
     ['`embed_dims`']),
    ('num-tokens-string', lambda p: p['blocks'][0].update(num_tokens='abc'),
     ['`blocks[0].num_tokens`', "'abc'"]),
    ('complex-matrix', lambda p: p['blocks'][0].update(
        whitening=torch.eye(32, dtype=torch.complex64)),
     ['`blocks[0].whitening`', 'real', 'complex64']),
    ('integer-matrix', lambda p: p['blocks'][0].update(
        whitening=torch.eye(32, dtype=torch.int64)),
     ['`blocks[0].whitening`', 'real']),
    ('complex-sigma', lambda p: p['blocks'][0].update(
        sigma=torch.eye(32, dtype=torch.complex128)),
     ['`blocks[0].sigma`', 'complex128']),
    ('sparse-matrix', lambda p: p['blocks'][0].update(
        whitening=torch.eye(32).to_sparse()),
     ["['blocks'][0]['whitening']", 'sparse']),
    ('fingerprint-string', lambda p: p['blocks'][0].update(
        qkv_fingerprint='x'), ['`blocks[0].qkv_fingerprint`']),
    ('block-not-dict', lambda p: p['blocks'].update({0: [1, 2]}),
     ['blocks[0]', 'dict']),
    # Header fields: a wrong type or a value no whitening file can have.
    ('num-images-string', lambda p: p.update(num_images='8'),
     ['`num_images`', "'8'"]),
    ('num-images-zero', lambda p: p.update(num_images=0),
     ['`num_images`', '>= 1, got 0']),
    ('num-heads-tensor', lambda p: p.update(num_heads=torch.tensor(2)),
     ['`num_heads`', 'tensor']),
    ('num-heads-not-dividing', lambda p: p.update(num_heads=5),
     ['`num_heads`=5', 'divide']),
    ('header-key-missing', lambda p: p.pop('prompt_depth'),
     ['lacks `prompt_depth`']),
    ('layers-not-the-blocks', lambda p: p.update(layers=[0, 1]),
     ['`layers`', '[0]', '[0, 1]']),
    ('layers-string', lambda p: p.update(layers='all'),
     ['`layers`', "'all'"]),
    ('prompt-type-int', lambda p: p.update(prompt_type=3),
     ['`prompt_type`', '3']),
    ('prompt-depth-unknown', lambda p: p.update(prompt_depth='middle'),
     ['`prompt_depth`', "'middle'"]),
    ('statistics-not-dict', lambda p: p.update(statistics='paper'),
     ['`statistics`', "'paper'"]),
    ('statistics-unknown-key', lambda p: p['statistics'].update(mode='x'),
     ['`statistics`', "'mode'"]),
    ('statistics-bad-eps', lambda p: p['statistics'].update(eps=-1.0),
     ['`statistics`', '`eps`', '-1.0']),
    ('statistics-bad-product', lambda p: p['statistics'].update(
        product='vq'), ['`statistics`', '`product`', "'vq'"]),
    ('block-key-string', lambda p: p['blocks'].update(x=p['blocks'][0]),
     ['`blocks`', "'x'"]),
    ('block-key-out-of-range', lambda p: p['blocks'].update(
        {7: p['blocks'][0]}), ['`blocks`', '7']),
    ('num-tokens-negative', lambda p: p['blocks'][0].update(num_tokens=-4),
     ['`blocks[0].num_tokens`', '>= 0, got -4']),
    ('condition-number-nan', lambda p: p['blocks'][0].update(
        condition_number=float('nan')),
     ['`blocks[0].condition_number`', 'finite number >= 1', 'nan']),
    ('condition-number-below-one', lambda p: p['blocks'][0].update(
        condition_number=0.5), ['`blocks[0].condition_number`', '0.5']),
    # Entries no writer made: a hand edit, refused by name, never ignored.
    ('header-extra-key', lambda p: p.update(whitening_eps=1e-3),
     ['unknown entries', "'whitening_eps'"]),
    ('block-extra-key', lambda p: p['blocks'][0].update(basis=torch.eye(2)),
     ['`blocks[0]`', 'unknown entries', "'basis'"]),
    # Values no ZCA whitening (U diag(s^-1/2) U^T) has: they became the
    # prompts' projection without an error.
    ('zero-matrix', lambda p: p['blocks'][0].update(
        whitening=torch.zeros(32, 32)), ['block 0', 'all zeros']),
    ('stride0-singular-matrix', lambda p: p['blocks'][0].update(
        whitening=torch.ones(1).expand(32, 32)),
     ['block 0', 'not positive definite']),
    ('negative-definite-matrix', lambda p: p['blocks'][0].update(
        whitening=-torch.eye(32)), ['block 0', 'not positive definite']),
    ('non-symmetric-matrix', lambda p: p['blocks'][0].update(
        whitening=torch.eye(32) + torch.triu(torch.ones(32, 32), 1)),
     ['block 0', 'not symmetric']),
])
def test_whitening_file_with_wrong_types_is_refused(tmp_path, case, edit,
                                                    words):
    vit, path = whitening_file(tmp_path)
    assert 0 in load_whitening(path, vit)  # the unedited file loads
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    with pytest.raises(ValueError) as err:
        load_whitening(path, vit)
    msg = str(err.value)
    assert path in msg
    for word in words:
        assert word in msg, (case, msg)


# ------------------------------------- what bpt_mm writes loads weights-only
def test_plain_form_round_trips_mmengine_state():
    buffer = HistoryBuffer(max_length=5)
    for value in (0.5, 1.5, 2.5):
        buffer.update(value, count=2)
    np.random.seed(3)
    state = dict(
        message_hub=dict(log_scalars={'loss': buffer},
                         runtime_info={'best': np.float64(0.25),
                                       'seed': np.int64(7)}),
        random_state=dict(numpy=np.random.get_state(),
                          python=(3, tuple(range(5)), None)),
        meta=dict(name=np.str_('coco'), flag=np.bool_(True),
                  big_endian=np.arange(3, dtype='>f8'), shape=torch.Size(
            [2, 3]), dtype=torch.float16, classes=('a', 'b')))
    data = io.BytesIO()
    torch.save(to_plain(state), data)
    data.seek(0)
    back = from_plain(torch.load(data, weights_only=True))
    restored = back['message_hub']['log_scalars']['loss']
    assert isinstance(restored, HistoryBuffer)
    assert restored.max_length == 5
    for got, want in zip(restored.data, buffer.data):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert restored.mean() == buffer.mean()
    info = back['message_hub']['runtime_info']
    assert type(info['best']) is np.float64 and info['best'] == 0.25
    assert type(info['seed']) is np.int64 and info['seed'] == 7
    np.random.set_state(back['random_state']['numpy'])
    first = np.random.rand()
    np.random.seed(3)
    assert first == np.random.rand()
    assert np.array_equal(back['meta']['big_endian'], np.arange(3.))
    assert back['meta']['shape'] == torch.Size([2, 3])
    assert back['meta']['classes'] == ('a', 'b')
    assert type(back['meta']['name']) is str and back['meta']['name'] == 'coco'
    assert type(back['meta']['flag']) is np.bool_ and back['meta']['flag']
    assert buffer.data[0].dtype == np.float64  # the input is untouched


def test_values_without_a_plain_form_are_refused_at_save(tmp_path):
    class Custom:
        pass

    path = str(tmp_path / 'x.pth')
    for bad, where in (({'meta': {'hook': Custom()}}, "['meta']['hook']"),
                       ({'x': np.array(['a'], dtype=object)}, "['x']"),
                       ({'x': {TAG: 'numpy'}}, "['x']")):
        with pytest.raises(TypeError) as err:
            save_plain_checkpoint(bad, path)
        assert where in str(err.value)
    assert not osp.exists(path)


@pytest.mark.parametrize('tagged, words', [
    ({TAG: 'numpy', 'value': torch.ones(2), 'scalar': 'yes'}, ['scalar']),
    ({TAG: 'numpy', 'value': [1], 'scalar': False}, ['dense tensor']),
    ({TAG: 'HistoryBuffer', 'log': None, 'count': None, 'max_length': 2},
     ['1-d numpy']),
    ({TAG: 'HistoryBuffer', 'log': None, 'count': None, 'max_length': 0},
     ['positive int']),
    ({TAG: 'HistoryBuffer', 'max_length': 1,
      'log': {TAG: 'numpy', 'value': torch.ones(3), 'scalar': False},
      'count': {TAG: 'numpy', 'value': torch.ones(3), 'scalar': False}},
     ['max_length=1']),
    ({TAG: 'pickle', 'value': 1}, ['unknown']),
])
def test_malformed_plain_entries_are_refused_by_key(tmp_path, tagged, words):
    path = str(tmp_path / 'odd.pth')
    torch.save({'message_hub': {'entry': tagged}}, path)
    with pytest.raises(CheckpointError) as err:
        load_local_checkpoint(path)
    msg = str(err.value)
    assert path in msg and "['message_hub']['entry']" in msg
    for word in words:
        assert word in msg, msg


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.linear(torch.stack(inputs))
        if mode == 'loss':
            return dict(loss=(out ** 2).mean())
        return out


def runner_with_numpy_info(work_dir, max_iters, resume=False):
    from mmengine.hooks import Hook

    class NumpyInfo(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            runner.message_hub.update_info('toy/best', np.float64(0.5))

    return toy_runner(
        work_dir, hooks=[dict(type='RandomStateHook'), NumpyInfo()],
        model=ToyModel(), dataset=[dict(inputs=torch.full((2, ), float(i)))
                                   for i in range(8)],
        shuffle=True, batch_size=2, max_iters=max_iters, lr=0.1,
        checkpoint_interval=2, log_interval=1,
        experiment_name=f'toy_{max_iters}_{resume}', resume=resume)


def test_runner_checkpoints_load_weights_only_and_resume(tmp_path):
    runner_with_numpy_info(tmp_path, max_iters=2).train()
    path = tmp_path / 'iter_2.pth'
    plain = torch.load(path, weights_only=True)  # torch alone reads it
    assert plain['message_hub']['log_scalars']['train/loss'][TAG] == \
        'HistoryBuffer'
    assert plain['message_hub']['runtime_info']['toy/best'][TAG] == 'numpy'
    ckpt = load_local_checkpoint(str(path))
    loss = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(loss, HistoryBuffer) and len(loss.data[0]) == 2
    assert ckpt['random_state']['numpy'][0] == 'MT19937'

    runner = runner_with_numpy_info(tmp_path, max_iters=4, resume=True)
    runner.train()
    assert runner.iter == 4
    hub = runner.message_hub
    # The resumed history continues the saved one.
    assert len(hub.get_scalar('train/loss').data[0]) == 4
    assert np.array_equal(hub.get_scalar('train/loss').data[0][:2],
                          loss.data[0])
    assert type(hub.get_info('toy/best')) is np.float64
    torch.load(tmp_path / 'iter_4.pth', weights_only=True)


def test_foreign_checkpoint_is_refused_then_converted_with_trust(tmp_path):
    buffer = HistoryBuffer()
    buffer.update(2.0)
    foreign = str(tmp_path / 'mmdet_epoch_1.pth')
    # What plain mmdet/mmseg write: pickled HistoryBuffer and numpy values.
    torch.save(dict(meta=dict(epoch=1, seed=np.int64(5)),
                    state_dict={'w': torch.ones(2)},
                    message_hub=dict(log_scalars={'loss': buffer})), foreign)
    with pytest.raises(CheckpointError) as err:
        CheckpointLoader.load_checkpoint(foreign, map_location='cpu')
    msg = str(err.value)
    assert foreign in msg and 'HistoryBuffer' in msg
    assert 'convert_checkpoint.py --trust' in msg

    tool = osp.join(ROOT, 'tools', 'convert_checkpoint.py')
    out = str(tmp_path / 'converted.pth')
    convert = load_tool(tool).main
    with pytest.raises(SystemExit, match='without --trust'):
        convert([foreign, out])
    assert not osp.exists(out)
    done = subprocess.run([sys.executable, tool, '--trust', foreign, out],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'weights_only=True' in done.stdout
    ckpt = load_local_checkpoint(out)
    assert ckpt['meta']['seed'] == 5 and type(ckpt['meta']['seed']) is \
        np.int64
    assert ckpt['message_hub']['log_scalars']['loss'].current() == 2.0
    before = open(out, 'rb').read()
    with pytest.raises(SystemExit, match='exists'):
        convert(['--trust', foreign, out])
    with pytest.raises(SystemExit, match="--drop 'nope'"):
        convert(['--trust', foreign, str(tmp_path / 'b.pth'), '--drop',
                 'nope'])
    assert open(out, 'rb').read() == before
    assert not osp.exists(tmp_path / 'b.pth')
    # Converting a converted (or bpt_mm-written) file is harmless.
    again = str(tmp_path / 'again.pth')
    convert(['--trust', out, again])
    assert load_local_checkpoint(again)['message_hub']['log_scalars'][
        'loss'].current() == 2.0


def load_tool(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('convert_checkpoint', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _CodeRunner:
    """Unpickling it calls ``os.mkdir(path)``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path, )


def test_url_checkpoints_are_read_weights_only(tmp_path, monkeypatch):
    """``load_from``/``tools/test.py`` with an ``https://`` or
    ``open-mmlab://`` name: mmengine's loader would fully unpickle the
    download (torch.hub.load_state_dict_from_url defaults to
    weights_only=False). The download (faked: no network here) is cached
    and read like a local file: code is refused, a plain checkpoint loads.
    """
    served = {}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        with open(served[url], 'rb') as src, open(dst, 'wb') as out:
            out.write(src.read())

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    proof = str(tmp_path / 'made_by_the_file')
    evil = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'w': torch.ones(2)},
                'x': _CodeRunner(proof)}, evil)
    url = 'https://example.invalid/models/evil.pth'
    served[url] = evil
    with pytest.raises(CheckpointError) as err:
        CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert 'evil.pth' in str(err.value) and url in str(err.value)
    assert not osp.exists(proof)
    # open-mmlab:// names resolve to a URL and go the same way.
    from mmengine.runner.checkpoint import get_external_models
    name, model_url = next(iter(get_external_models().items()))
    served[model_url] = evil
    with pytest.raises(CheckpointError):
        CheckpointLoader.load_checkpoint(f'open-mmlab://{name}',
                                         map_location='cpu')
    assert not osp.exists(proof)

    good = str(tmp_path / 'good.pth')
    torch.save({'state_dict': {'w': torch.ones(2)}}, good)
    url = 'https://example.invalid/models/good.pth'
    served[url] = good
    ckpt = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    assert osp.isfile(tmp_path / 'hub' / 'checkpoints' / 'good.pth')


def test_zip_with_a_member_name_twice_is_refused(tmp_path, trusted):
    """torch's zip reader and Python's zipfile choose different copies of a
    repeated member name: a file could show the checks one pickle and torch
    another. torch.save never repeats a name, so such a file is refused."""
    import warnings
    path = str(tmp_path / 'twice.pth')
    torch.save({'w': torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    pkl = next(n for n in members if n.endswith('data.pkl'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # zipfile warns: duplicate name
        with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as out:
            for name, data in members.items():
                out.writestr(name, data)
            out.writestr(pkl, members[pkl])
    with pytest.raises(CheckpointError) as err:
        load_local_checkpoint(path)
    assert 'twice.pth' in str(err.value) and pkl in str(err.value)
    trusted()
