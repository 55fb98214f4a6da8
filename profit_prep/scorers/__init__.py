"""Scorers: the reference model's log-probability of every token, behind one ``Scorer`` contract.

``base`` is the contract (and the in-process transformers scorer, the correctness oracle),
``choose`` picks and builds a backend, ``vllm_engine`` runs vLLM in process, ``vllm_server`` talks
to running vLLM servers (``server_answers``, ``server_probe``), ``top_k`` derives top-k signals;
``models`` locates model folders, ``gpu`` and ``sizing`` answer GPU questions.
"""
