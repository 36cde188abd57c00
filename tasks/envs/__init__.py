"""Multi-turn environment tasks (TextWorldExpress, ALFWorld) run through ``harness.agent``."""
