"""The other seeds: CARMA re-tuning and its tasks, information emergence, compositionality probes, routed mechanisms."""
