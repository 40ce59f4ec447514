"""Shared test settings."""

import torch

# The tests use small tensors, for which OpenMP's thread wake-ups on a 2-core machine cost more
# than they save (measured: a 40k-element multiply takes 10 µs on one thread, 0.4 ms on two).
torch.set_num_threads(1)
