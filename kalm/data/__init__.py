"""Data curation: read category sources, normalise, filter, deduplicate (exact, near), decontaminate."""
