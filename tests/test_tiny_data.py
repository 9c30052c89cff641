"""Tests of bpt_mm.testing.tiny_data and tools/make_tiny_data.py (CPU, a
few s).

bpt_mm/testing/tiny_data.py is loaded by path: it needs only numpy and
cv2, while importing the bpt_mm package pulls in torch, timm and the models
(seconds), and these tests should run (and stay fast) before those are
installed.
"""
import doctest
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
from typing import Dict

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# pycocotools' decode is not yet numpy-2 clean; the warning is not ours.
pytestmark = pytest.mark.filterwarnings(
    'ignore:__array__ implementation:DeprecationWarning')


def _load_tiny_data():
    name = 'bpt_mm_tiny_data'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, osp.join(REPO, 'bpt_mm', 'testing', 'tiny_data.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tiny_data = _load_tiny_data()
ADE_CLASS_IDS = tiny_data.ADE_CLASS_IDS
COCO_SHAPES = tiny_data.COCO_SHAPES
MANIFEST_NAME = tiny_data.MANIFEST_NAME
ensure_tiny_data = tiny_data.ensure_tiny_data
make_ade20k_semantic = tiny_data.make_ade20k_semantic
make_coco_instances = tiny_data.make_coco_instances


def read_tree(root: str) -> Dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = f.read()
    return out


def mtimes(root: str) -> Dict[str, int]:
    return {
        osp.relpath(osp.join(d, n), root): os.stat(osp.join(d, n)).st_mtime_ns
        for d, _, names in os.walk(root)
        for n in names
    }


# ---------------------------------------------------------------- COCO ----
@pytest.mark.parametrize('make, kwargs', [
    (make_coco_instances, dict(num_train=3, num_val=2)),
    (make_ade20k_semantic, dict(num_train=3, num_val=2)),
])
def test_deterministic(tmp_path, make, kwargs):
    a = make(str(tmp_path / 'a'), seed=3, **kwargs)
    b = make(str(tmp_path / 'b'), seed=3, **kwargs)
    c = make(str(tmp_path / 'c'), seed=4, **kwargs)
    tree_a, tree_b = read_tree(a['root']), read_tree(b['root'])
    tree_c = read_tree(c['root'])
    assert len(tree_a) > 0 and tree_a == tree_b
    assert sorted(tree_a) == sorted(tree_c)
    # Every image differs with another seed, not just some.
    for rel in tree_a:
        if not rel.endswith('.json'):
            assert tree_a[rel] != tree_c[rel], rel


def test_images_do_not_depend_on_split_sizes(tmp_path):
    small = make_coco_instances(str(tmp_path / 's'), num_train=2, num_val=1)
    large = make_coco_instances(str(tmp_path / 'l'), num_train=4, num_val=1)
    name = '000000000002.png'
    with open(osp.join(small['train_img_dir'], name), 'rb') as f1, \
            open(osp.join(large['train_img_dir'], name), 'rb') as f2:
        assert f1.read() == f2.read()


@pytest.mark.parametrize('num_classes, image_size', [(3, (160, 128)),
                                                     (5, (64, 48))])
def test_coco_annotations_match_pixels(tmp_path, num_classes, image_size):
    info = make_coco_instances(str(tmp_path),
                               num_train=10,
                               num_val=3,
                               image_size=image_size,
                               num_classes=num_classes,
                               max_objects=4,
                               seed=1)
    assert info['classes'] == tuple(s.name for s in COCO_SHAPES[:num_classes])
    assert info['num_images'] == {'train': 10, 'val': 3}
    seen = set()
    for split in ('train', 'val'):
        coco = COCO(info[f'{split}_ann_file'])
        cats = coco.loadCats(coco.getCatIds())
        assert [c['id'] for c in cats] == list(range(1, num_classes + 1))
        assert [c['name'] for c in cats] == list(info['classes'])
        assert len(coco.getAnnIds()) == info['num_annotations'][split]
        for img_info in coco.loadImgs(coco.getImgIds()):
            path = osp.join(info[f'{split}_img_dir'], img_info['file_name'])
            img = np.asarray(Image.open(path).convert('RGB'))
            assert img.shape == (img_info['height'], img_info['width'], 3)
            assert (img_info['width'], img_info['height']) == image_size
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_info['id']))
            assert 1 <= len(anns) <= 4
            union = np.zeros(img.shape[:2], dtype=np.int32)
            by_class = {}
            for ann in anns:
                seen.add(ann['category_id'])
                assert ann['iscrowd'] == 0
                assert len(ann['segmentation']) == 1
                assert len(ann['segmentation'][0]) >= 6
                mask = coco.annToMask(ann).astype(bool)
                union += mask
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann['bbox']
                mask_box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                np.testing.assert_allclose(mask_box, [x, y, x + w, y + h],
                                           atol=1.5)
                assert 12 - 1e-6 <= max(w, h) <= 60 + 1e-6
                assert ann['area'] == mask.sum()
                cls_mask = by_class.setdefault(ann['category_id'],
                                               np.zeros_like(mask))
                cls_mask |= mask
            # Objects never overlap.
            assert union.max() <= 1
            # The pixels painted in a class colour are exactly the masks of
            # that class: pycocotools' polygon rasterization is reproduced.
            for k, shape in enumerate(COCO_SHAPES, 1):
                painted = np.all(img == shape.rgb, axis=2)
                expected = by_class.get(k, np.zeros(img.shape[:2], bool))
                assert np.array_equal(painted, expected), (path, k)
    assert seen == set(range(1, num_classes + 1))


# -------------------------------------------------------------- ADE20K ----
def test_ade20k_layout_and_labels(tmp_path):
    info = make_ade20k_semantic(str(tmp_path),
                                num_train=6,
                                num_val=2,
                                image_size=(48, 32),
                                seed=2)
    assert info['class_ids'] == (1, 3, 13, 150) == ADE_CLASS_IDS[:4]
    assert info['num_images'] == {'train': 6, 'val': 2}
    allowed = {0, *info['class_ids']}
    for split, count in (('train', 6), ('val', 2)):
        img_dir, ann_dir = info[f'{split}_img_dir'], info[f'{split}_ann_dir']
        imgs = sorted(os.listdir(img_dir))
        anns = sorted(os.listdir(ann_dir))
        assert len(imgs) == count
        assert all(n.endswith('.jpg') for n in imgs)
        assert all(n.endswith('.png') for n in anns)
        assert [n[:-4] for n in imgs] == [n[:-4] for n in anns]
        seen = set()
        for img_name, ann_name in zip(imgs, anns):
            img = Image.open(osp.join(img_dir, img_name))
            label_img = Image.open(osp.join(ann_dir, ann_name))
            assert img.format == 'JPEG' and img.mode == 'RGB'
            assert label_img.format == 'PNG' and label_img.mode == 'L'
            assert img.size == label_img.size == (48, 32)
            label = np.asarray(label_img)
            values = set(np.unique(label).tolist())
            assert values <= allowed
            assert 0 in values and len(values) >= 2
            seen |= values
            # Regions carry their class colour (JPEG: up to edge ringing).
            rgb = np.asarray(img.convert('RGB')).astype(np.float64)
            for j, cls in enumerate(info['class_ids']):
                if (label == cls).sum() >= 20:
                    median = np.median(rgb[label == cls], axis=0)
                    assert np.abs(median - tiny_data._ADE_RGB[j]).max() < 12
        if split == 'train':
            assert seen == allowed


def test_ade20k_class_range(tmp_path):
    info = make_ade20k_semantic(str(tmp_path),
                                num_train=6,
                                num_val=1,
                                image_size=(16, 16),
                                num_classes_used=6)
    labels = set()
    for name in os.listdir(info['train_ann_dir']):
        label = np.asarray(Image.open(osp.join(info['train_ann_dir'], name)))
        labels |= set(np.unique(label).tolist())
    assert labels == {0, *ADE_CLASS_IDS}


# ----------------------------------------------------------- arguments ----
@pytest.mark.parametrize('make, kwargs, name', [
    (make_coco_instances, dict(num_train=0), 'num_train'),
    (make_coco_instances, dict(num_val=-1), 'num_val'),
    (make_coco_instances, dict(num_train=2.5), 'num_train'),
    (make_coco_instances, dict(image_size=(31, 128)), 'image_size'),
    (make_coco_instances, dict(image_size=(160, 20)), 'image_size'),
    (make_coco_instances, dict(image_size=160), 'image_size'),
    (make_coco_instances, dict(num_classes=0), 'num_classes'),
    (make_coco_instances, dict(num_classes=len(COCO_SHAPES) + 1),
     'num_classes'),
    (make_coco_instances, dict(max_objects=0), 'max_objects'),
    (make_coco_instances, dict(seed=-1), 'seed'),
    (make_ade20k_semantic, dict(num_train=0), 'num_train'),
    (make_ade20k_semantic, dict(image_size=(8, 8)), 'image_size'),
    (make_ade20k_semantic, dict(num_classes_used=0), 'num_classes_used'),
    (make_ade20k_semantic, dict(num_classes_used=len(ADE_CLASS_IDS) + 1),
     'num_classes_used'),
    (ensure_tiny_data, dict(num_val=0), 'num_val'),
    (ensure_tiny_data, dict(coco=dict(bogus=1)), 'bogus'),
])
def test_bad_arguments(tmp_path, make, kwargs, name):
    root = str(tmp_path / 'out')
    with pytest.raises(ValueError, match=name) as err:
        make(root, **kwargs)
    if 'num_classes' in name:
        assert '[1, ' in str(err.value)  # the allowed range is named
    # Nothing that looks like a finished set is left behind.
    assert not osp.exists(osp.join(root, 'coco'))
    assert not osp.exists(osp.join(root, 'ade20k'))


# -------------------------------------------------------------- ensure ----
SMALL = dict(num_train=2, num_val=1)


def test_ensure_is_idempotent(tmp_path):
    root = str(tmp_path / 'tiny')
    first = ensure_tiny_data(root, **SMALL)
    assert first['coco']['generated'] and first['ade20k']['generated']
    assert sorted(os.listdir(root)) == ['ade20k', 'coco']  # no temp left
    before = mtimes(root)
    second = ensure_tiny_data(root, **SMALL)
    assert not second['coco']['generated']
    assert not second['ade20k']['generated']
    assert mtimes(root) == before
    for key in ('coco', 'ade20k'):
        a = dict(first[key], generated=None)
        b = dict(second[key], generated=None)
        assert a == b
    assert osp.isfile(second['coco']['train_ann_file'])
    assert second['coco']['train_ann_file'].startswith(root)
    assert second['coco']['classes'] == ('square', 'disk', 'triangle')
    manifest = json.load(open(osp.join(root, 'coco', MANIFEST_NAME)))
    assert manifest['version'] == tiny_data.GENERATOR_VERSION
    assert manifest['params']['num_train'] == 2


def test_ensure_regenerates_when_out_of_date(tmp_path):
    root = str(tmp_path / 'tiny')
    ensure_tiny_data(root, **SMALL)
    coco_manifest = osp.join(root, 'coco', MANIFEST_NAME)

    # Another generator version.
    manifest = json.load(open(coco_manifest))
    manifest['version'] = -1
    json.dump(manifest, open(coco_manifest, 'w'))
    out = ensure_tiny_data(root, **SMALL)
    assert out['coco']['generated'] and not out['ade20k']['generated']
    assert json.load(open(coco_manifest))['version'] != -1

    # A file went missing.
    os.remove(osp.join(out['ade20k']['val_ann_dir'], 'ADE_val_00000001.png'))
    out = ensure_tiny_data(root, **SMALL)
    assert out['ade20k']['generated'] and not out['coco']['generated']
    assert osp.isfile(
        osp.join(out['ade20k']['val_ann_dir'], 'ADE_val_00000001.png'))

    # Other parameters: old files of the previous set do not linger.
    out = ensure_tiny_data(root, seed=1, num_train=1, num_val=1)
    assert out['coco']['generated'] and out['ade20k']['generated']
    assert os.listdir(out['coco']['train_img_dir']) == ['000000000001.png']
    assert sorted(os.listdir(root)) == ['ade20k', 'coco']

    # force always rewrites.
    out = ensure_tiny_data(root, seed=1, num_train=1, num_val=1, force=True)
    assert out['coco']['generated'] and out['ade20k']['generated']


def test_ensure_interrupted_leaves_no_set(tmp_path, monkeypatch):
    root = str(tmp_path / 'tiny')
    real_imwrite = tiny_data._imwrite

    def imwrite_then_die(path, *args, **kwargs):
        # Killed after the first ADE20K image hit the disk.
        real_imwrite(path, *args, **kwargs)
        if path.endswith('.jpg'):
            raise KeyboardInterrupt

    monkeypatch.setattr(tiny_data, '_imwrite', imwrite_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_data(root, **SMALL)
    # coco was finished before, ade20k never appears half-made, and no
    # temporary folder is left.
    assert sorted(os.listdir(root)) == ['coco']

    # An interrupted regeneration keeps the previous, complete set.
    monkeypatch.undo()
    ensure_tiny_data(root, **SMALL)
    before = read_tree(osp.join(root, 'ade20k'))
    monkeypatch.setattr(tiny_data, '_imwrite', imwrite_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_data(root, **SMALL, force=True)
    assert sorted(os.listdir(root)) == ['ade20k', 'coco']
    assert read_tree(osp.join(root, 'ade20k')) == before
    monkeypatch.undo()
    out = ensure_tiny_data(root, **SMALL)
    assert not out['coco']['generated'] and not out['ade20k']['generated']


def test_doctests(tmp_path, monkeypatch):
    # The examples write to tempfile.mkdtemp(); keep that inside tmp_path.
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    result = doctest.testmod(tiny_data, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------- CLI ----
def test_cli(tmp_path):
    out = str(tmp_path / 'tiny')
    cmd = [
        sys.executable,
        osp.join('tools', 'make_tiny_data.py'), '--out', out, '--seed', '2',
        '--num-train', '2', '--num-val', '1'
    ]
    proc = subprocess.run(cmd,
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'coco: wrote' in proc.stdout and 'ade20k: wrote' in proc.stdout
    coco = COCO(osp.join(out, 'coco', 'annotations', 'instances_val2017.json'))
    assert len(coco.getImgIds()) == 1
    assert len(os.listdir(osp.join(out, 'ade20k', 'images', 'training'))) == 2
    # In-process for the remaining cases: a second interpreter start-up
    # costs more than the checks.
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import make_tiny_data
    finally:
        sys.path.remove(osp.join(REPO, 'tools'))
    argv = ['--out', out, '--seed', '2', '--num-train', '2', '--num-val', '1']
    assert make_tiny_data.main(argv) == 0
    assert make_tiny_data.main(['--out', out, '--num-train', '0']) == 2
