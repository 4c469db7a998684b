"""The validator-facing path: request in -> checks -> decode -> batch -> answer."""
