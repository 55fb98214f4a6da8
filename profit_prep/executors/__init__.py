"""Executors: where a scoring job runs. ``local`` in this process, ``ray`` on a Ray cluster
(``placement`` decides where its actors go). Both run the same steps (``profit_prep.job``).
"""
