"""glassbox.train."""
