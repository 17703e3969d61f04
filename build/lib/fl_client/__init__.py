"""Flower ClientApp: one hospital's DP-SGD training of the shared LoRA adapter."""
