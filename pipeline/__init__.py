"""lookalike's core library: pure functions and classes, no Ray, no argparse, no side effects on import."""
