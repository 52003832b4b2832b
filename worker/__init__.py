"""chat-relay worker: pulls jobs from Redis, streams the upstream, publishes every chunk."""
