"""glassbox.interop."""
