"""The model: CLIP and the dual encoder, the EfficientNet image tower, model folders and cards,
and the scorer that turns embeddings into calibrated predictions (the only layer that imports
transformers, and only in ``towers`` and ``efficientnet``)."""
