"""Attention layers (to come: nn.MultiheadAttention and the Transformer layers)."""
