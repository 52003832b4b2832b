"""What the web tier and the worker share: the Redis key schema and scripts, the job store and
queue, the event wire format, conversations, settings, connections, metrics and logs.

Nothing here imports Flask, the web tier or the worker, so a worker process loads no web code.
"""
