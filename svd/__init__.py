"""svd: a miner daemon for the NATIX StreetVision subnet (Bittensor subnet 72)."""

__version__ = "0.1.0"
