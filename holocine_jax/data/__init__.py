"""Data: the synthetic multi-shot world, video I/O, manifests and datasets, the Grain pipeline."""
