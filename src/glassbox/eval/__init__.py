"""glassbox.eval."""
