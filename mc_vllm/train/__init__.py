"""Training of MegaContext's small nets against a frozen base model (torch +
transformers; never vLLM)."""
