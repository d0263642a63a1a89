"""The method registry: all 20 of mergekit's names, every module listed, each documented."""

import importlib
import pkgutil

import mergelib.methods as methods
from mergelib.methods import METHOD_MODULES, REGISTRY, MethodSpec

MERGEKIT_METHODS = {
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "passthrough", "model_stock", "arcee_fusion",
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "nearswap", "sce", "ram", "ramplus_tl",
}
NOT_METHOD_MODULES = {"base", "fused", "keep", "masks", "select", "torch_kernels", "global_topk",
                      "kernel_warmup"}  # shared helpers, not methods


BEYOND_MERGEKIT = {"tsv", "iso_c", "iso_cts", "wudi", "ties_paper", "regmean", "regmean_plus_plus", "fisher"}  # methods from the literature that mergekit does not ship


def test_registry_has_mergekits_twenty_and_the_methods_beyond():
    assert set(REGISTRY) == MERGEKIT_METHODS | BEYOND_MERGEKIT
    assert len(MERGEKIT_METHODS) == 20 and len(REGISTRY) == 28


def test_every_method_module_is_listed_once():
    found = {m.name for m in pkgutil.iter_modules(methods.__path__)} - NOT_METHOD_MODULES
    listed = {m.__name__.rsplit(".", 1)[1] for m in METHOD_MODULES}
    assert found == listed
    assert len(listed) == len(METHOD_MODULES)
    for name in found:
        module = importlib.import_module(f"mergelib.methods.{name}")
        assert module.SPECS and all(isinstance(s, MethodSpec) for s in module.SPECS)
        assert module.__doc__ and module.__doc__.strip()


def test_each_spec_is_documented_and_consistent():
    for spec in REGISTRY.values():
        assert spec.summary and spec.paper.startswith("http"), spec.name
        assert spec.base in ("required", "optional", "input", "none")
        assert spec.min_models >= 1
        assert spec.max_models is None or spec.max_models >= spec.min_models
        assert spec.params.model_config.get("extra") == "forbid"
        assert spec.model_params.model_config.get("extra") == "forbid"
