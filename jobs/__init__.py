"""Command-line jobs: each module is `python -m jobs.<name>` with a `main(argv=None)`."""
