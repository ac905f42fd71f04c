"""Inputs: image files, PDF pages, stdin and conversation files, with their provenance."""
