"""An OAuth 2.0 authorisation server with RFC 8693 Token Exchange, for the e2e tests.

Built from authlib's AuthorizationServer (Flask integration): its client authentication
(client_secret_basic), grant dispatch, error responses and RFC 9068 JWT access-token
generator. authlib ships no token-exchange grant (authlib.oauth2.rfc8693 is empty), so
the grant is registered here the way authlib documents custom grants.

    python -m tests.e2e.oauth_as --port P --subject-key ISSUER_PEM --client-id gateway \
        --client-secret-file F [--subject-issuer mcp-bastion-local] [--subject-audience mcp-bastion] \
        [--expires-in 3600] [--deny-sub mallory]

The subject token must be a JWT of the gateway's embedded issuer (its key file), with the
gateway's audience. The issued token: iss = this server, sub = the subject's sub, aud =
the requested audience, act = {"sub": <authenticated client id>} (RFC 8693 section 4.1),
signed RS256, keys at /jwks. GET /stats counts token requests (to prove caching).
The refresh_token grant (authlib's RefreshTokenGrant) rotates: each use issues a new refresh
token and revokes the old one; --refresh-token SUB=TOKEN seeds one.
"""
from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import jwt as pyjwt
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error, UnauthorizedClientError
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from flask import Flask, jsonify
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import make_server

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class InvalidTargetError(OAuth2Error):
    """RFC 8693 section 2.2.2."""
    error = "invalid_target"


class AccessDenied(OAuth2Error):
    error = "access_denied"
    status_code = 400


@dataclass
class Client(ClientMixin):
    client_id: str
    secret: str

    def get_client_id(self):
        return self.client_id

    def check_client_secret(self, client_secret):
        import hmac
        return hmac.compare_digest(client_secret.encode(), self.secret.encode())

    def check_endpoint_auth_method(self, method, endpoint):
        return method == "client_secret_basic"

    def check_grant_type(self, grant_type):
        return grant_type in (TOKEN_EXCHANGE, "refresh_token")

    def get_allowed_scope(self, scope):
        return scope or ""

    def get_default_redirect_uri(self):
        return None

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_response_type(self, response_type):
        return False


@dataclass
class Delegation:
    """The user the issued token is about, and the audience asked for."""
    sub: str
    audience: str

    def get_user_id(self):
        return self.sub


class TokenExchangeGrant(grants.BaseGrant, grants.TokenEndpointMixin):
    GRANT_TYPE = TOKEN_EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]
    # set by make_app
    subject_key = None
    subject_issuer = ""
    subject_audience = ""
    denied: frozenset = frozenset()
    audiences: frozenset = frozenset()

    def validate_token_request(self):
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError()
        form = self.request.form
        token, ttype = form.get("subject_token"), form.get("subject_token_type")
        if not token or ttype not in (ACCESS_TOKEN, JWT_TYPE):
            raise InvalidRequestError("subject_token and a supported subject_token_type are required")
        if form.get("requested_token_type") not in (None, ACCESS_TOKEN):
            raise InvalidRequestError("only access tokens are issued")
        audience = form.get("audience")
        if audience not in self.audiences:
            raise InvalidTargetError("unknown audience")
        try:
            claims = pyjwt.decode(token, self.subject_key, algorithms=["ES256"], issuer=self.subject_issuer,
                                  audience=self.subject_audience, options={"require": ["exp", "sub"]})
        except pyjwt.PyJWTError as e:
            raise InvalidRequestError(f"subject_token rejected: {type(e).__name__}") from None
        if claims["sub"] in self.denied:
            raise AccessDenied("this subject may not be delegated")
        self.request.client = client
        self.request.user = Delegation(claims["sub"], audience)

    def create_token_response(self):
        token = self.generate_token(user=self.request.user, scope=self.request.form.get("scope"),
                                    include_refresh_token=False)
        token["issued_token_type"] = ACCESS_TOKEN
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


@dataclass
class RefreshRecord:
    token: str
    sub: str
    client_id: str

    def check_client(self, client):
        return client.get_client_id() == self.client_id

    def get_scope(self):
        return ""

    def is_expired(self):
        return False

    def is_revoked(self):
        return False


class RotatingRefreshGrant(grants.RefreshTokenGrant):
    """authlib's refresh grant with rotation: each use issues a new refresh token and
    revokes the old one (a reused refresh token gets invalid_grant)."""
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]
    INCLUDE_NEW_REFRESH_TOKEN = True
    store: dict = {}
    audience = ""

    def authenticate_refresh_token(self, refresh_token):
        return self.store.get(refresh_token)

    def authenticate_user(self, credential):
        return Delegation(credential.sub, self.audience)

    def revoke_old_credential(self, credential):
        self.store.pop(credential.token, None)


class ActorTokenGenerator(JWTBearerTokenGenerator):
    def __init__(self, issuer: str, key: RSAKey, expires_in: int):
        from authlib.common.security import generate_token
        super().__init__(issuer, alg="RS256", expires_generator=expires_in,
                         refresh_token_generator=lambda client, grant_type, user, scope: generate_token(42))
        self.key = key

    def get_jwks(self):
        return KeySet([self.key])      # a key set: joserfc then names the key (kid) in the header

    def get_audiences(self, client, user, scope):
        return user.audience

    def get_extra_claims(self, client, grant_type, user, scope):
        return {"act": {"sub": client.get_client_id()}}     # RFC 8693 section 4.1


def make_app(issuer: str, subject_key_pem: bytes, client: Client, expires_in: int, audiences: set[str],
             subject_issuer: str, subject_audience: str, denied: set[str],
             refresh_tokens: dict[str, str] | None = None) -> Flask:
    app = Flask("oauth_as")
    key = RSAKey.generate_key(2048, parameters={"kid": "as-key-1", "use": "sig", "alg": "RS256"}, private=True)
    stats = {"token_requests": 0, "issued": 0, "by_sub": {}, "refreshed": {}}
    lock = threading.Lock()
    RotatingRefreshGrant.store = {rt: RefreshRecord(rt, sub, client.client_id)
                                  for sub, rt in (refresh_tokens or {}).items()}
    RotatingRefreshGrant.audience = sorted(audiences)[0]

    def save_token(token, request):
        with lock:
            stats["issued"] += 1
            sub = request.user.sub
            counter = "refreshed" if request.payload.grant_type == "refresh_token" else "by_sub"
            stats[counter][sub] = stats[counter].get(sub, 0) + 1
            if token.get("refresh_token"):
                RotatingRefreshGrant.store[token["refresh_token"]] = RefreshRecord(
                    token["refresh_token"], sub, client.client_id)

    server = AuthorizationServer(app, query_client=lambda cid: client if cid == client.client_id else None,
                                 save_token=save_token)
    priv = load_pem_private_key(subject_key_pem, None)
    TokenExchangeGrant.subject_key = priv.public_key()
    TokenExchangeGrant.subject_issuer, TokenExchangeGrant.subject_audience = subject_issuer, subject_audience
    TokenExchangeGrant.denied, TokenExchangeGrant.audiences = frozenset(denied), frozenset(audiences)
    server.register_grant(TokenExchangeGrant)
    server.register_grant(RotatingRefreshGrant)
    server.register_token_generator("default", ActorTokenGenerator(issuer, key, expires_in))

    @app.post("/token")
    def token():
        with lock:
            stats["token_requests"] += 1
        return server.create_token_response()

    @app.get("/jwks")
    def jwks():
        return jsonify(KeySet([key]).as_dict(private=False))

    @app.get("/stats")
    def get_stats():
        with lock:
            return jsonify(stats)

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests.e2e.oauth_as")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--subject-key", required=True, help="PEM private key of the gateway's embedded issuer")
    ap.add_argument("--subject-issuer", default="mcp-bastion-local")
    ap.add_argument("--subject-audience", default="mcp-bastion")
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--client-secret-file", required=True)
    ap.add_argument("--audience", action="append", required=True, help="audience this server issues tokens for")
    ap.add_argument("--expires-in", type=int, default=3600)
    ap.add_argument("--deny-sub", action="append", default=[])
    ap.add_argument("--refresh-token", action="append", default=[], metavar="SUB=TOKEN",
                    help="a refresh token this server has issued to SUB (rotated on use)")
    args = ap.parse_args(argv)
    issuer = f"http://127.0.0.1:{args.port}"
    app = make_app(issuer, Path(args.subject_key).read_bytes(),
                   Client(args.client_id, Path(args.client_secret_file).read_text().strip()),
                   args.expires_in, set(args.audience), args.subject_issuer, args.subject_audience,
                   set(args.deny_sub), dict(r.split("=", 1) for r in args.refresh_token))
    srv = make_server("127.0.0.1", args.port, app, threaded=True)
    print(f"READY {issuer}", flush=True)
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
