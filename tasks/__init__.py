"""Prefect tasks only: thin wrappers that add retries, tags and names around plain stage functions."""
