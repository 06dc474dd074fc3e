"""attncc: an attention compiler."""
