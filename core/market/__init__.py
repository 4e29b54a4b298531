"""Market data: bar files on disk and a synthetic bar generator."""
