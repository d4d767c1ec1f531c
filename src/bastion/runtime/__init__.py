"""Model runtimes: the seam between a worker and the code that runs a model."""
