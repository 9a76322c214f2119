"""Evaluation of an Encoder on local files, one task type per module."""
