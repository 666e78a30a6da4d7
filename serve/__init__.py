"""Ray Serve application: the online similarity search graph (see docs/ARCHITECTURE.md)."""
