"""lorakit: Low-Rank Adaptation for transformer models."""
