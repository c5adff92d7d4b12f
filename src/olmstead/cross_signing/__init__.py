"""Our cross-signing identity: keys, signatures, secret storage and the recovery key.

``CrossSigningMachine`` (held by ``OlmMachine`` as ``cross_signing``) builds the
requests and checks the answers; ``secret_storage`` is the
``m.secret_storage.v1.aes-hmac-sha2`` cipher and the recovery key format;
``identity`` checks our identity as ``/keys/query`` publishes it.
"""

from olmstead.cross_signing.identity import OwnIdentity, published_identity
from olmstead.cross_signing.machine import SECRET_NAMES, CrossSigningMachine, CrossSigningStatus
from olmstead.cross_signing.secret_storage import decode_recovery_key, encode_recovery_key

__all__ = [
    "SECRET_NAMES",
    "CrossSigningMachine",
    "CrossSigningStatus",
    "OwnIdentity",
    "decode_recovery_key",
    "encode_recovery_key",
    "published_identity",
]
