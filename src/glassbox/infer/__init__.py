"""glassbox.infer."""
