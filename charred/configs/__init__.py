"""charred.configs."""
