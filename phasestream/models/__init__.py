"""Pretrained models (GMVAE, InDI): networks, training, artifact registry. Never imported by callbacks."""
