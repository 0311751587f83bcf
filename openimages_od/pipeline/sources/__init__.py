"""Image sources: where image bytes come from, one module per source (see :mod:`.base`)."""
