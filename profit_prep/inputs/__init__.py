"""Input: an SFT dataset's raw rows (files, folders, HF datasets) and their shapes (``--format``).

``sources`` hands out raw rows by index range, ``formats`` turns a row into chat messages,
``checks`` and ``duplicate_ids`` refuse what cannot be trusted, ``preflight`` tries the chosen
format and template on the first rows before anything is scored.
"""
