"""Recipe search: a search space over a mergekit recipe, scored on validation prompts, driven by an Optuna study
whose storage is the record of every trial; trials run in-process or as Ray tasks."""
