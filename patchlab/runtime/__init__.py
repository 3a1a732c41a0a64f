"""Models (load, placement, memory), identity, hook sites, the one trace primitive, decoding and scoring."""
