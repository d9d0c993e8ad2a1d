"""Embedding cache of the vision pool (content hash, refcounted per request): the vision issue."""
