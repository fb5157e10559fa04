"""Example: a FastAPI app that enqueues report jobs and serves their status and results.
See README.md in this directory."""
