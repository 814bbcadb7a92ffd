"""datus: dense semantic pseudo masks from unlabelled images with a frozen self-supervised ViT.

Implements the DatUS method (Kumar, Sur, Baruah, IEEE TCDS 2024) as a PyTorch Lightning
batch-inference application. README.md says how to use it, ARCHITECTURE.md how it is built.
"""

__version__ = "0.2.0"
