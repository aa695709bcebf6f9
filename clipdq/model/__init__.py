"""The model: CLIP and the dual encoder (``towers``), its tokenizer, the EfficientNet image tower,
model folders (``files``), their metadata (``meta``) and cards (``card``), and the scorer that
turns embeddings into calibrated predictions (the only layer that imports transformers, and only
in ``towers``, ``tokenizer`` and ``efficientnet``)."""
