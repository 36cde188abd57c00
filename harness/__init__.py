"""memgen-bench core: config, models, runner, metrics, store, CLI and MemGen."""
