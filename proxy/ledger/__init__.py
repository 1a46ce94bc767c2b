"""The ledger: one row per request, written in batches, hash-chained per writer."""
