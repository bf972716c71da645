"""Weights I/O: the safetensors reader and writer, checkpoint rules, model weights in the kernels' layout,
prepared per-rank files and their command line, hub download, and the small JSON files beside them."""
