"""Scorers: the reference model's log-probability of every token, behind one ``Scorer`` contract.

``base`` is the contract: scoring, and each backend's own set-up (pre-flight check, import
check, worker environment, CPU binding), which executors ask for and nothing else; ``choose``
picks and builds a backend. The backends: ``transformers_model`` (in process, the correctness
oracle), ``vllm_engine`` (vLLM in process), ``vllm_server`` (running vLLM servers:
``server_answers``, ``server_reading``, ``server_probe``), ``NullScorer`` in ``base`` (no model);
``top_k`` derives top-k signals; ``models`` locates model folders, ``gpu`` and ``sizing`` answer
GPU questions.
"""
