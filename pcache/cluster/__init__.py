"""pcache cluster building blocks (issue 3, in progress): block placement and peer authentication.

- :func:`owners` / :class:`Placement`: rendezvous (highest random weight) hashing over live members.
- :func:`sign_request` / :func:`verify_request` / :func:`load_token`: HMAC request signing.
"""

from pcache.cluster.auth import AuthError, load_token, sign_request, verify_request
from pcache.cluster.placement import Placement, owners

__all__ = ["AuthError", "Placement", "load_token", "owners", "sign_request", "verify_request"]
