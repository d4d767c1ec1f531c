"""The queue protocol on Redis Streams: enqueue, consume, reclaim, complete, dead-letter."""
