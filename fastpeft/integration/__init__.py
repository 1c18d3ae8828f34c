"""transformers and PEFT integration: the fastpeft attention implementation, accelerate/restore."""
