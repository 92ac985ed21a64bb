"""dinoserve: DINO self-supervised image features, from training to a served index.

``from dinoserve import Client`` is the entry point for embeddings; it never imports torch.
"""

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import dinoserve` stays cheap (the client pulls in onnxruntime only when used).
    if name == "Client":
        from dinoserve.client import Client

        return Client
    raise AttributeError(f"module 'dinoserve' has no attribute {name!r}")
