"""`map`: one command over many items, as a durable, distributed GNU parallel."""
