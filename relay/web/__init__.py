"""The web tier: the Flask app that takes jobs in and streams their events out to viewers.

``app`` builds it; ``api``, ``chatgpt_web`` and ``pages`` are its blueprints; ``submission`` and
``streams`` do a request's work; ``fanout``, ``subscription`` and ``streaming`` share one Redis
subscription per process among its viewers; ``sse`` is the wire format.
"""
