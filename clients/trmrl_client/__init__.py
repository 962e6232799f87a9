"""trmrl-client: talk to a trmrl policy service from a robot or simulator, without torch.

Only numpy and httpx are required; WebSocket streaming and MessagePack need the ``stream`` extra
(``pip install 'trmrl-client[stream]'``). The simulator client, the robot loop and the demo are a
distribution of their own on top of this library, ``trmrl-sim`` (``clients/sim``).

Example:
    >>> from trmrl_client import PolicyClient
    >>> with PolicyClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     session = client.session()
    ...     action = session.act([0.0, 0.0], episode_start=True)
"""

from trmrl_client.errors import ServiceError, ServiceUnavailable
from trmrl_client.http import AsyncPolicyClient, PolicyClient
from trmrl_client.protocol import ModelInfo
from trmrl_client.session import AsyncSession, Session
from trmrl_client.vector import AsyncVectorSession, VectorSession

__version__ = "0.1.0"

__all__ = [
    "AsyncPolicyClient",
    "AsyncSession",
    "AsyncVectorSession",
    "ModelInfo",
    "PolicyClient",
    "ServiceError",
    "ServiceUnavailable",
    "Session",
    "StreamingSession",
    "VectorSession",
]


def __getattr__(name: str) -> object:
    # The stream module needs the optional websockets package: import it only when asked for.
    if name == "StreamingSession":
        from trmrl_client.stream import StreamingSession

        return StreamingSession
    raise AttributeError(f"module 'trmrl_client' has no attribute {name!r}")
