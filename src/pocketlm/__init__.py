"""pocketlm: private, personal language models that learn together (CoMiGS) and steer the cloud (CoSteer)."""

__version__ = "0.1.0"
