"""threads: conversation trees built from post events."""
