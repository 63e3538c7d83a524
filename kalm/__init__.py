"""kalm-pipeline: shared core (schema, storage, configs, recipes, CLI)."""

__version__ = "0.1.0"
