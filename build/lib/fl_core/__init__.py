"""Shared core: configuration, data loading, model building and the local train/evaluate task."""
