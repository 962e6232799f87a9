"""trmrl-client: talk to a trmrl policy service from a robot or simulator, without torch.

Only numpy and httpx are required; WebSocket streaming and MessagePack need the ``stream`` extra
(``pip install 'trmrl-client[stream]'``).
"""

__version__ = "0.1.0"
