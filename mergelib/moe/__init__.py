"""`mergelib moe`: a sparse mixture of experts from dense models (config schema, router rows, the build)."""
