"""Data layer: TFDS builders, SeqIO tasks and input pipelines.

Importing this package does not import TensorFlow; only the builder, task and
pipeline modules do, so that the renderer and word lists serve TF-free hosts.
"""
