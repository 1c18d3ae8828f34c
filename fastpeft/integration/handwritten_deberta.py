"""DeBERTa / DeBERTa-v2: placeholder until the family's patch lands (registers nothing)."""
