"""Architecture knowledge as data: which tensors a model has, which are per-layer, embeddings and ties."""

from mergelib.arch.spec import ArchSpec, WeightSpec, infer_spec, load_specs, spec_for

__all__ = ["ArchSpec", "WeightSpec", "infer_spec", "load_specs", "spec_for"]
