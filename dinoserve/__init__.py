"""dinoserve: DINO self-supervised image features, from training to a served index.

``from dinoserve import Client`` is the entry point for embeddings; it never imports torch.
"""

__version__ = "0.1.0"
