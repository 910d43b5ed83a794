"""glassbox.data."""
