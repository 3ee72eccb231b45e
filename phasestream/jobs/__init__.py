"""Post-scan jobs: one function per job returning a JobOutcome, and the executors that run them (inline, Dask)."""
