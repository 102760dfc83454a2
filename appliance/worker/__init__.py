"""The child side of the pool: what runs in a worker after ``fork()``."""
