"""What stages/ calls: fetch and lock the inputs, evaluate and report, tokenizer check, export, publish, sweep,
and MLflow tracking. The stages only translate config into these calls."""
