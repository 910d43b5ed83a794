"""Beyond the context window: chunking, retrieval (BM25, dense, hybrid), retrieval-
augmented answers with citations, and map-reduce summaries."""
