"""Sharded, resumable jobs and their serial / local / Ray backends."""
