"""The HTTP gateway: pyoco-server's API on Quart-Trio, with push SSE, idempotent submits and the
audit history.  ``create_app`` builds the app; ``server.run_gateway`` serves it with Hypercorn."""
