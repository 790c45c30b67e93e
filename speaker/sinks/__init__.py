"""Built-in sinks: one component per module, named like its type."""
