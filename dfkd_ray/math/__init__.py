"""Pure math: imports ``torch`` only (no transformers, vLLM or Ray), tested on hand-made tensors."""
