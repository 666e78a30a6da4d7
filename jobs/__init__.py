"""Command-line jobs: each module is `python -m jobs.<name>` with a `main(argv=None)`."""

import logging

# FAISS's loader logs at INFO which SIMD build it tried and could not load (three lines per
# process); which build runs is not the user's concern, so only its warnings are shown.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
