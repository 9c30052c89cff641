"""Generated data and a generated pretrained backbone for the demo and the
tests: fixtures, not part of training or inference.

Nothing in the rest of the package imports this subpackage
(``tests/test_architecture_rules.py`` checks it); ``tools/make_tiny_data.py``
and ``tools/demo.py`` use it. Import the modules directly
(``bpt_mm.testing.tiny_data``, ``bpt_mm.testing.tiny_pretrain``).
"""
