"""The `hvplace` operator CLI: a gRPC client of the coordinator (client.py, endpoint
failover and credentials), its rendering (render.py), one module per noun, and the
argument parser and entry point (main.py). `hvplace lab ...` runs the lab's own entry point."""
