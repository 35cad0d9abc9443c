"""Model zoo, loading/saving and the encoder wrapper."""
