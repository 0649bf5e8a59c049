"""pcache conformance suite: one abstract test class, run by every origin kind through an empty subclass."""
