"""Built-in task plugins (the six KnowEdit tasks), installed as ``knowbench.tasks``."""
