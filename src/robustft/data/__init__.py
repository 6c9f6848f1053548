"""Datasets: on-disk readers, the registry of settings, transforms, and the toyshift generator."""
