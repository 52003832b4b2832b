"""Development tools: the upstream simulator (``python -m relay.dev.simulator``) and the demo
that ``deploy/run.sh`` streams (``python -m relay.dev.demo``). Not used by the relay itself."""
