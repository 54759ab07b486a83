"""Evaluation protocols: verification, retrieval, pairs files, open set, episodes, reports."""
