"""Prefect flows only: they wire tasks together and hold no logic of their own."""
