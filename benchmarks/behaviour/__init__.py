"""Behavioural benchmark of the merge methods: Tier A (digits MLP, seconds) and Tier B (the demo LM family)."""
