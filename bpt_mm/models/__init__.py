from .necks import LayerNorm2d, SimpleFeaturePyramid
from .prompts import (BasePrompt, BilinearPrompt, SPTPrompt, VPTPrompt,
                      WhitenedPrompt)
from .vit import PromptedViT, WhiteningNotReadyError

__all__ = [
    'PromptedViT', 'WhiteningNotReadyError', 'BasePrompt', 'VPTPrompt',
    'SPTPrompt', 'WhitenedPrompt', 'BilinearPrompt', 'SimpleFeaturePyramid',
    'LayerNorm2d'
]
