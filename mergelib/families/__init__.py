"""Model families made offline: the trained demo family and its data, SmolLM2 with LoRA fine-tunes, and the
seeded tiny families the tests and benchmarks generate."""
