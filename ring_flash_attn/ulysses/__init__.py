"""Ulysses (all-to-all head parallelism) and Ulysses x ring (2D) attention, composed over the ring and
all-gather families."""
