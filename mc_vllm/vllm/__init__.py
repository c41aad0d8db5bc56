"""The only code that touches vLLM: plugin entry point, scheduler, KV layout, worker hooks."""
