"""datus: dense semantic pseudo masks from unlabelled images with a frozen self-supervised ViT.

Implements the DatUS method (Kumar, Sur, Baruah, IEEE TCDS 2024) as a PyTorch Lightning
batch-inference application. See README.md for usage and DESIGN notes for the method.
"""

__version__ = "0.1.0"
