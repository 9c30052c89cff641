"""The typed prompt contract: PromptConfig, the per-type options, and what
prompt modules answer to the backbone, the preflight and the collector."""
import pytest
import torch
from mmengine.config import Config

from bpt_mm.launch import check_whitening_source
from bpt_mm.models import PromptedViT, WhitenedPrompt
from bpt_mm.models.prompt_config import PromptConfig, prompt_type_options
from bpt_mm.models.prompts import VPTPrompt, WhitenedOptions
from bpt_mm.registry import PROMPTS
from bpt_mm.whitening.collect import apply_whitening, whitening_blocks

ARCH = dict(embed_dims=16, num_layers=3, num_heads=2, mlp_ratio=2.0)


def tiny_vit(prompt: dict) -> PromptedViT:
    return PromptedViT(arch=ARCH, img_size=16, patch_size=8, prompt=prompt)


@pytest.mark.parametrize('prompt, whitening, prototypes, projection', [
    (dict(type='VPTPrompt'), False, False, False),
    (dict(type='SPTPrompt'), False, True, False),
    (dict(type='WhitenedPrompt'), True, False, False),
    (dict(type='WhitenedPrompt', tunable=True), True, False, True),
    (dict(type='BilinearPrompt', rank=2), False, False, True),
    (dict(type='BilinearPrompt', rank=2, whitening_init=True), True, False,
     True),
])
def test_config_and_modules_answer_the_same(prompt, whitening, prototypes,
                                            projection):
    prompt = dict(prompt, num_tokens=3, depth='deep')
    config = PromptConfig.from_dict(prompt, num_layers=3)
    assert (config.needs_whitening, config.needs_prototypes,
            config.has_trainable_projection) == (whitening, prototypes,
                                                 projection)
    assert config.needs_data_pass == (whitening or prototypes)
    assert config.trainable_projection_layers == \
        ((0, 1, 2) if projection else ())
    model = tiny_vit(prompt)
    assert model.prompt_cfg == config.as_dict()
    for module in model.prompts.values():
        assert module.needs_whitening == whitening
        assert module.needs_prototypes == prototypes
        assert module.has_trainable_projection == projection
        trains = {n for n, p in module.named_parameters()}
        assert bool(trains & {'whitening', 'basis'}) == projection
    assert whitening_blocks(model) == ([0, 1, 2] if whitening else [])
    waived = PromptConfig.from_dict(
        dict(prompt, allow_identity_whitening=True), num_layers=3)
    assert not waived.needs_data_pass


def test_defaults_are_filled_once():
    config = PromptConfig.from_dict(
        dict(type='bpt_mm.WhitenedPrompt', num_tokens=2), num_layers=3)
    assert config.type == 'WhitenedPrompt'
    assert config.options == WhitenedOptions(tunable=False, init_std=0.02)
    assert (config.depth, config.layers, config.dropout,
            config.allow_identity_whitening) == ('shallow', (0, ), 0., False)
    assert config.prompt_class is WhitenedPrompt


@pytest.mark.parametrize('prompt, exc, pattern', [
    (dict(type='WhitenedPrompt', tunable=1), TypeError, r'prompt\.tunable'),
    (dict(type='WhitenedPrompt', init_std=float('nan')), ValueError,
     r'`prompt\.init_std`'),
    (dict(type='BilinearPrompt', rank='4'), TypeError, r'`prompt\.rank`'),
    (dict(type='BilinearPrompt'), ValueError,
     r'`prompt\.rank` is required for BilinearPrompt'),
    (dict(type='BilinearPrompt', rank=2, whitening_init='yes'), TypeError,
     r'prompt\.whitening_init'),
    (dict(type='SPTPrompt', init='kmean'), ValueError, r'`prompt\.init`'),
    (dict(type='VPTPrompt', rank=2), ValueError,
     r'unknown key `prompt\.rank` for VPTPrompt'),
    (dict(type='Whitened'), ValueError, r'`prompt\.type` must be one of'),
])
def test_options_are_refused_by_key_before_any_module(prompt, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PromptConfig.from_dict(dict(prompt, num_tokens=2), num_layers=3)
    if 'unknown key' not in pattern:
        # The preflight's view (type and type options only) says the same.
        with pytest.raises(exc, match=pattern):
            prompt_type_options(prompt)


def test_apply_whitening_writes_through_the_prompt():
    whitened = WhitenedPrompt(num_tokens=2, embed_dims=4)
    w = 2 * torch.eye(4, dtype=torch.float64)
    whitened.apply_whitening({'whitening': w})
    assert whitened.whitening.dtype == torch.float32
    assert torch.equal(whitened.whitening, w.float())
    assert whitened.is_whitened
    with pytest.raises(TypeError, match='neither set_whitening nor'):
        VPTPrompt(num_tokens=2, embed_dims=4).apply_whitening({'whitening': w})


def test_bilinear_basis_is_built_from_its_rank():
    model = tiny_vit(dict(type='BilinearPrompt', num_tokens=3, rank=2,
                          whitening_init=True))
    assert model.prompts['0'].basis_rank == 2
    apply_whitening(model, {0: {'whitening': torch.eye(16)}})
    basis = model.prompts['0'].basis
    assert basis.shape == (16, 2) and model.prompts['0'].is_whitened
    # W = I: B = C has orthonormal columns.
    torch.testing.assert_close(basis.t() @ basis, torch.eye(2))


def test_a_new_prompt_type_is_asked_not_named():
    # A type the preflight has never heard of, which needs whitening through
    # its options: the preflight refuses it without a hook, by asking.
    @PROMPTS.register_module()
    class ScaledWhitenedPrompt(WhitenedPrompt):
        pass

    try:
        cfg = Config(dict(model=dict(backbone=dict(
            type='PromptedViT', prompt=dict(type='ScaledWhitenedPrompt',
                                            num_tokens=2)))))
        with pytest.raises(ValueError, match='needs whitening matrices'):
            check_whitening_source(cfg)
        cfg.model.backbone.prompt.allow_identity_whitening = True
        check_whitening_source(cfg)
    finally:
        PROMPTS._module_dict.pop('ScaledWhitenedPrompt')
