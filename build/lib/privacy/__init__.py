"""Differential-privacy math: calibration, accounting, DP-SGD wiring, per-sample losses. Imports no Flower."""
