"""Helpers for the bundled protein example: the ESM-like encoder and the synthetic FASTA."""
