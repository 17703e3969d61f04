"""Flower ServerApp, the simulation entry point and the server-side round loop."""
