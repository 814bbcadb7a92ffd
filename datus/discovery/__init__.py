"""Stages 1-5, per image on the device: backbones, keys and affinity (ops), Louvain (communities,
louvain), segment embedding (embedding), and the LightningModule that runs them (module)."""
