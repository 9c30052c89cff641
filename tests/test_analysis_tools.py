"""Burstiness analysis (bpt_mm.analysis.token_statistics, its report and
tools/analyze_burstiness.py) and the parameter table (tools/param_table.py).
"""
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
from PIL import Image

from bpt_mm.analysis.report import DPI, FIGURE_SIZE, plot_block
from bpt_mm.analysis.token_statistics import (QUANTITIES, analyse_backbone,
                                              resolve_blocks)
from bpt_mm.whitening.linalg import query_key_product
from bpt_mm.whitening.options import WhiteningOptions
from helpers import ROOT, load_tool, run, small_vit, tool
from whitening_toy import toy_images

TINY_DET = osp.join(ROOT, 'configs', 'tiny', 'mask_rcnn_bpt_tiny.py')
PNG_SIZE = (int(FIGURE_SIZE[0] * DPI), int(FIGURE_SIZE[1] * DPI))


# ------------------------------------------------------------- analysis
@pytest.fixture(scope='module')
def toy_analysis():
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(type='BilinearPrompt',
                                     num_tokens=4, rank=4))
    images = toy_images(12)
    results = analyse_backbone(backbone, images.split(4), [0, 2],
                               num_images=10, max_values=10**7)
    return backbone, images, results


def test_whitened_projection_has_identity_second_moment(toy_analysis):
    _, _, results = toy_analysis
    for block, r in results.items():
        dim = 32
        assert r['num_images'] == 10 and r['num_tokens'] == 10 * 16
        assert r['num_tokens_sampled'] == r['num_tokens']  # all kept
        whitened = torch.from_numpy(r['values']['whitened']).reshape(-1, dim)
        moment = whitened.T @ whitened / whitened.shape[0]
        error = torch.linalg.norm(moment - torch.eye(dim, dtype=moment.dtype))
        assert float(error) / math.sqrt(dim) < 1e-3, block
        assert r['whitening_identity_error'] < 1e-3
        # whitening changes the data: the projected values are not white
        projected = torch.from_numpy(r['values']['projected']).reshape(-1,
                                                                       dim)
        raw = projected.T @ projected / projected.shape[0]
        assert float(torch.linalg.norm(raw - torch.eye(dim))) > 1.0


def test_quantities_are_the_defined_ones(toy_analysis):
    backbone, images, results = toy_analysis
    # Block 0's input, computed here without the backbone's iterator:
    # patch embedding + position embedding (prompts come after the CLS).
    with torch.no_grad():
        x = backbone.patch_embed(images[:10]).flatten(2).transpose(1, 2)
        x = x + backbone.pos_embed[:, 1:]
    product = query_key_product(
        backbone.blocks[0].attn.qkv.weight.detach().double())
    r = results[0]
    np.testing.assert_allclose(r['values']['x'], x.double().reshape(-1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        r['values']['projected'],
        (x.double().reshape(-1, 32) @ product.T).reshape(-1),
        rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sort(r['values']['qk_product']),
                               np.sort(product.reshape(-1).numpy()))
    assert set(r['stats']) == set(QUANTITIES)
    for stats in r['stats'].values():
        assert stats['best'] in ('gaussian', 'laplacian', 'hyper-laplacian',
                                 'generalized-gaussian')


def test_sampling_caps_the_values_and_keeps_sigma_over_all_tokens():
    torch.manual_seed(0)
    backbone = small_vit()
    results = analyse_backbone(backbone, toy_images(8).split(4), [1],
                               num_images=8, max_values=32 * 40, seed=3)
    r = results[1]
    assert r['num_tokens'] == 8 * 16
    assert r['num_tokens_sampled'] == 40  # 20 of each batch of 64
    assert r['values']['x'].size == 40 * 32
    assert r['whitening_identity_error'] < 1e-3  # over all 128 tokens


def test_bad_layers_and_arguments_are_named():
    backbone = small_vit()  # 3 blocks
    assert resolve_blocks(backbone, None) == [0]
    assert resolve_blocks(backbone, [-1, 0, 2]) == [0, 2]
    with pytest.raises(ValueError, match=r'--layers: 3 .*allowed: 0 to 2'):
        resolve_blocks(backbone, [3])
    with pytest.raises(ValueError, match='--num-images'):
        analyse_backbone(backbone, [], [0], num_images=0)
    with pytest.raises(ValueError, match='no image'):
        analyse_backbone(backbone, [], [0], num_images=4)
    with pytest.raises(ValueError, match="statistic"):
        analyse_backbone(backbone, toy_images(4).split(4), [0],
                         options=WhiteningOptions(statistic='authors'))
    # one image: 16 tokens for 32 channels, Sigma is singular
    with pytest.warns(UserWarning, match='tokens'), \
            pytest.raises(ValueError, match=r'block 0: .*--eps'):
        analyse_backbone(backbone, toy_images(1).split(1), [0], num_images=1)
    prompted = small_vit(prompt=dict(
        type='VPTPrompt', num_tokens=2, depth='deep', layers=[1, 2]))
    assert resolve_blocks(prompted, []) == [1, 2]


def test_analyze_burstiness_help_names_each_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool('analyze_burstiness').build_parser().parse_args(['--help'])
    assert exit_info.value.code == 0
    # argparse wraps the help: compare it with its whitespace collapsed.
    text = ' '.join(capsys.readouterr().out.split())
    defaults = WhiteningOptions()
    hook = "default the config's BPTWhiteningHook entry, else "
    for flag, expected in [
            ('--source', hook + repr(defaults.source)),
            ('--tokens', hook + repr(defaults.tokens)),
            ('--product', hook + repr(defaults.product)),
            ('--no-center', hook + repr(defaults.center)),
            ('--num-images', 'default 100'), ('--eps', 'default 0'),
            ('--bins', 'default 120'), ('--seed', 'default 0')]:
        after_flag = text.split(f' {flag} ', 1)[1].split(' --', 1)[0]
        assert expected in after_flag, (flag, after_flag)


def test_plot_is_a_png_of_the_expected_size(toy_analysis, tmp_path):
    _, _, results = toy_analysis
    path = str(tmp_path / 'b.png')
    size = plot_block(results[2], 2, path, title='toy')
    assert size == PNG_SIZE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == 'PNG' and img.size == PNG_SIZE
        pixels = np.asarray(img.convert('L'))
    # something is drawn: not a blank canvas
    assert pixels.std() > 10


# ----------------------------------------------------------------- tool
def test_analyze_burstiness_tool_on_a_tiny_config(tiny_workspace, tmp_path):
    out = tmp_path / 'analysis'
    text = run(tool('analyze_burstiness.py', TINY_DET, '--out', out,
                    '--num-images', '8', '--layers', '0', '-1'),
               tiny_workspace)
    assert 'took' in text
    for block in (0, 3):
        path = out / f'block_{block}.png'
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size == PNG_SIZE
    report = json.loads((out / 'burstiness.json').read_text())
    assert report['images'] == 8 and report['blocks'] == [0, 3]
    for block in ('0', '3'):
        r = report['results'][block]
        assert r['num_tokens'] == 8 * 80  # 160x128 images, 16 px patches
        assert r['whitening_identity_error'] < 1e-3
        assert set(r['stats']) == set(QUANTITIES)
    markdown = (out / 'burstiness.md').read_text()
    assert '## Block 0' in markdown and '## Block 3' in markdown


def test_analyze_burstiness_errors_name_the_option(tiny_workspace, tmp_path,
                                                   capsys, monkeypatch):
    tool_main = load_tool('analyze_burstiness').main
    out = str(tmp_path / 'out')

    def error_of(*args):
        with pytest.raises(SystemExit) as exc:
            tool_main([TINY_DET, '--out', out, *args])
        assert exc.value.code == 2
        return capsys.readouterr().err

    assert '--num-images must be a positive integer' in error_of(
        '--num-images', '0')
    assert "--num-images must be a positive integer, got 'x'" in error_of(
        '--num-images', 'x')
    assert 'invalid choice' in error_of('--source', 'nowhere')
    assert '--checkpoint: file not found' in error_of('--checkpoint',
                                                      'nope.pth')
    # no data/tiny in the working directory
    monkeypatch.chdir(tmp_path)
    err = error_of()
    assert 'train_dataloader.dataset.data_root' in err
    assert 'data/tiny/coco/' in err
    monkeypatch.chdir(tiny_workspace)
    assert '--layers: 4 is not a block of this 4-block ViT; allowed: 0 to 3' \
        in error_of('--layers', '4', '--num-images', '1')


# ---------------------------------------------------------- param table
#: The paper's ablation (ViT-B, m = 100, shallow) and its deep BPT.
PAPER = {'vpt': '7.68', 'bpt_fwhiten': '7.68', 'bpt_twhiten': '66.66',
         'bpt_bilinear_p75': '6.51', 'bpt_bilinear_deep_m50_p50': '18.36'}


def table_rows(text):
    """{model: [cells]} of a Markdown table printed by param_table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| ') and cells[0] != 'model':
            rows[cells[0]] = cells[1:]
    return rows


def test_param_table_of_the_builtin_variants(capsys, tmp_path):
    from bpt_mm.analysis.param_budget import COLUMNS
    out = tmp_path / 'table.md'
    assert load_tool('param_table').main(['--out', str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert out.read_text().strip().splitlines()[2].startswith('| vpt ')
    total = COLUMNS.index('total')
    for name, want in PAPER.items():
        assert rows[f'{name} (ViT-B)'][total] == want, name
    prompts, whitening = COLUMNS.index('prompts'), COLUMNS.index('whitening')
    # tWhiten: 76,800 prompt + 589,824 whitening parameters
    assert rows['bpt_twhiten (ViT-B)'][prompts] == '7.68'
    assert rows['bpt_twhiten (ViT-B)'][whitening] == '58.98'
    # fWhiten's W is a buffer: no trainable whitening
    assert rows['bpt_fwhiten (ViT-B)'][whitening] == '0.00'
    assert rows['vpt (ViT-B)'][COLUMNS.index('neck')] == '-'


def test_param_table_of_configs_and_bad_input(capsys):
    main = load_tool('param_table').main
    tiny = osp.join(ROOT, 'configs', 'tiny', 'upernet_bpt_tiny.py')
    twhiten = osp.join(ROOT, 'configs', 'mask_rcnn_bpt_twhiten.py')
    assert main([tiny, twhiten, '--variants', 'vpt']) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {'vpt (ViT-B)', 'upernet_bpt_tiny',
                         'mask_rcnn_bpt_twhiten'}
    # the real model built on the meta device (no checkpoint read), its
    # groups summing to the total
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from bpt_mm.utils import trainable_parameters
    cfg = Config.fromfile(tiny)
    init_default_scope(cfg.default_scope)
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    counts = trainable_parameters(model)
    cells = rows['upernet_bpt_tiny']
    assert cells[0] == f"{counts['prompts']['trainable'] / 1e4:.2f}"
    assert cells[-1] == f"{counts['all']['trainable'] / 1e4:.2f}"
    assert rows['mask_rcnn_bpt_twhiten'][:3] == ['7.68', '58.98', '0.00']
    for args, message in (([tiny + '.missing'], 'not found'),
                          (['--variants', 'nope'], 'invalid choice'),
                          (['--num-tokens', '0'], '--num-tokens')):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_no_prompts_measures_the_bare_vit(tiny_workspace, capsys,
                                          monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    out = tiny_workspace / 'no_prompts'
    main = load_tool('analyze_burstiness').main
    assert main([TINY_DET, '--out', str(out), '--no-prompts',
                 '--num-images', '4', '--layers', '1']) == 0
    report = json.loads((out / 'burstiness.json').read_text())
    assert report['prompts'] == 'removed (--no-prompts)'
    assert report['blocks'] == [1] and report['images'] == 4
    assert (out / 'block_1.png').is_file()
