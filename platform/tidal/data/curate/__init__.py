"""Curation stages as pure functions over documents: normalize, quality filters, PII scrub,
dedup. ``pipeline.curate_batch`` composes the per-document ones as a Ray Data operator."""
