"""headlock: a worker-pool crawler runtime for request queues with locks."""
