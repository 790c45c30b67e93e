"""Built-in stages: one component per module, named like its type."""
