"""Ray Serve application: the online similarity search graph (see DESIGN.md §2)."""
