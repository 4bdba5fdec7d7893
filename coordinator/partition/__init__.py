"""Partitioning: split a multimodal dataset into K equal, coherent clusters, one per expert."""
