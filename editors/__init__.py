"""Built-in editor plugins, installed as ``knowbench.editors``."""
