"""Where the CNN stage runs: in this process (local) or on a cluster (Ray Serve)."""
