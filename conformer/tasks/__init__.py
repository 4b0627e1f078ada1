"""Tasks selected by `task=` in the config: each is a function of (cfg, context) returning the objective."""
