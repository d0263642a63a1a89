"""Pipeline stages: `python -m stages.<name> [key=value ...]`, run by `dvc repro` in dvc.yaml order."""
