"""Document transport: the wire format, publisher, proxy, receiving worker and loss tracking (0MQ and bluesky only)."""
