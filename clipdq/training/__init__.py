"""Fine-tuning: configs and presets, labeled data, full / locked / prototype modes, learning curves."""
