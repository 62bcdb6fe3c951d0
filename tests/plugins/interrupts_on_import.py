"""A broken test plugin: raises KeyboardInterrupt while being imported."""

raise KeyboardInterrupt
