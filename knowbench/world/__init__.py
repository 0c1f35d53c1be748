"""The embedded synthetic fact world and the small model that knows it."""
