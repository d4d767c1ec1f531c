"""The public gateway: authenticates, validates, enqueues and relays. Holds no SQL credentials."""
