"""The DAG's last two stages: model soup (parameter averaging) and MTEB evaluation, offline first.

Modules (plain, typed, Prefect-free; ``kalm.orchestration`` wraps them), bottom to top:

- :mod:`~kalm.evaluation.checkpoints`: sentence-transformers folders: validation, structure.
- :mod:`~kalm.evaluation.config`: ``EvalConfig`` (``configs/eval.yaml``) and ``LocalTaskSpec``.
- :mod:`~kalm.evaluation.instructions`: the pinned instructions file (``configs/eval_instructions.yaml``).
- :mod:`~kalm.evaluation.encoder`: ``KalmEncoder``, the mteb encoder (instructions, Matryoshka truncation).
- :mod:`~kalm.evaluation.local_tasks`: mteb tasks over local Parquet/JSONL files, held-out rows, stdlib
  docstrings.
- :mod:`~kalm.evaluation.mteb_tasks`: task selection and resolution, the offline check.
- :mod:`~kalm.evaluation.scoring`: running mteb on one model (one worker per GPU), the greedy soup's
  ``DevScorer``.
- :mod:`~kalm.evaluation.results`: :func:`~kalm.evaluation.results.run_eval`, results cached per model
  fingerprint and (task, dim).
- :mod:`~kalm.evaluation.compare`: one comparison of base, stages and soup.
- :mod:`~kalm.evaluation.report`: summary and comparison tables (Parquet + Markdown) and bar charts.
- :mod:`~kalm.evaluation.soup`: ``SOUP_METHODS`` (uniform, weighted, greedy) and ``run_soup``.

See docs/evaluation.md. Nothing heavy is imported here, so ``kalm --help`` stays fast.
"""
