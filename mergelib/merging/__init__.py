"""The merge itself: recipe -> plan -> engine -> atomic output (api, plan, engine, card, rng, multi-stage recipes).

Named `merging`, not `merge`: `mergelib.merge` is the public function, and a subpackage of that name would replace
it on the package as soon as it was imported. Imports nothing, so `mergelib.merging.rng` stays cheap.
"""
