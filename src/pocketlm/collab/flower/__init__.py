"""CoMiGS on real devices with Flower (`pip install "pocketlm[flower]"`).

`client_app` / `server_app` hold the Flower apps declared in pyproject.toml (`flwr run .`); `settings` reads
Flower's run config; `task` is the engine-free work they call (the same `Device` / `Server` code and round
pieces as the in-process simulation); `state` keeps a device's private adapters and optimizer state on its own
disk; `strategy` is the CoMiGS-aware FedAvg; `secure` drives Flower's SecAgg+. Importing this package does not
import Flower.
"""
