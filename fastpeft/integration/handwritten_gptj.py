"""GPT-J on transformers releases where its attention is hand-written: placeholder until the family's patch lands
(registers nothing)."""
