"""Training: what a trainer takes. ``loader`` gives a ``datasets.Dataset`` with masks re-applied,
``collate`` and ``losses`` plug into PyTorch/TRL, ``exports`` writes LLaMA-Factory, axolotl and
ms-swift files.
"""
