"""Randomness that depends only on (seed, tensor name): the same masks on any thread count or order."""

from __future__ import annotations

import hashlib

import torch


def generator_for(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU generator seeded from a hash of the run seed and the output tensor name."""
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen
