"""The DAG's last two stages: model soup (parameter averaging) and MTEB evaluation, offline first.

Modules (plain, typed, Prefect-free; ``tasks/evaluation.py`` wraps them):

- :mod:`evaluation.checkpoints`: sentence-transformers folders: validation, structure, content fingerprints.
- :mod:`evaluation.soup`: ``SOUP_METHODS`` (uniform, weighted, greedy) and :func:`~evaluation.soup.run_soup`.
- :mod:`evaluation.config`: ``EvalConfig`` (``configs/eval.yaml``) and ``LocalTaskSpec``.
- :mod:`evaluation.instructions`: the pinned instructions file (``configs/eval_instructions.yaml``); the
  template and formatter are ``training.instructions``'.
- :mod:`evaluation.encoder`: ``KalmEncoder``, the mteb encoder (instructions, Matryoshka truncation).
- :mod:`evaluation.local_tasks`: mteb tasks over local Parquet/JSONL files, held-out rows, stdlib docstrings.
- :mod:`evaluation.mteb_eval`: task selection and resolution, the offline check, the device queue,
  :func:`~evaluation.mteb_eval.run_eval` (cached per model fingerprint), the greedy soup's ``DevScorer`` and
  :func:`~evaluation.mteb_eval.compare_models` (one comparison of base, stages and soup).
- :mod:`evaluation.report`: summary and comparison tables (Parquet + Markdown) and bar charts.
- :mod:`evaluation.cli`: ``eval_app`` (``kalm eval``, ``kalm soup``, ``kalm compare``, ``kalm eval-tasks``).

See docs/evaluation.md. Nothing heavy is imported here, so ``kalm --help`` stays fast.
"""
