"""LoRA: adapters extracted from weight deltas, and base + adapter materialised for `model+lora` inputs."""
