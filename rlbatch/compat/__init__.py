"""Drop-in modules for users of as_a_service, uBatch and batched: change only the import line."""
