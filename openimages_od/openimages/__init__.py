"""Open Images metadata: release layouts, classes and hierarchy, label maps, the shard plan."""
