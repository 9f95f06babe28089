"""Feedback storage: SQL schema and migrations, repository functions, blob store and dataset export.

Imports nothing from ``mmapp``, ``retrain`` or Gradio; rows hold references (hashes, versions, paths).
"""
