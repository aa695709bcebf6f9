"""Fine-tuning: the entry point and configs (``train``), labeled data (``labeled``), the full,
locked and prototype modes, the audit's view (``views``), the text tower (``texts``), calibration
and the model card's metrics, learning curves."""
