"""Built-in sources: one component per module, named like its type."""
