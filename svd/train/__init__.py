"""The learning loop: data sources, validator-exact augmentation and metrics, features, head fitting, gate, schedule."""
