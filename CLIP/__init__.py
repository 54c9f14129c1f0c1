"""MedVMAD model package: the backbone interface and its open_clip and timm + Hugging Face
implementations, the factory that builds them, the MedVMAD module and its memory bank, and checkpoints."""
