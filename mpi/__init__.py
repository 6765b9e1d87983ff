"""Everything that talks between ranks: the World, typed collectives, class partitioning.

Nothing here initialises MPI at import time; `init_world()` does, from the entry point's main().
"""
