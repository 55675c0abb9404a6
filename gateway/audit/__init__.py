"""The audit log: store, hash chain, rows and exported bundles."""
