"""The worker process: pulls jobs from Redis, batches them, runs models, replies. Accepts no connections."""
