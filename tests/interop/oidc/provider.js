// node-oidc-provider serving the OAuth 2.0 client-credentials grant over HTTPS on 127.0.0.1, for the identity
// provider tests (tests/oidc_provider.py starts it). One argument: a JSON settings file written by the test
// (port, TLS files, private signing key set, clients, resource, token lifetime, groups per client, events file).
//
// Stdout carries one JSON line, {"event": "listening", "issuer", "port"}, once it is ready. Each token request
// appends a JSON line ({"event": "grant.success" | "grant.error", "client_id", "error"}) to the events file before
// its response is sent, so a test can count exactly what reached the provider. Nothing here ever prints or writes
// a key, a secret or a token.
import { X509Certificate } from 'node:crypto';
import { appendFileSync, readFileSync } from 'node:fs';
import https from 'node:https';

import Provider, { errors } from 'oidc-provider';

const settings = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function record(event) {
  appendFileSync(settings.events, `${JSON.stringify(event)}\n`);
}

// The TLS layer asks for a client certificate and checks it against the CA, but lets a connection without one
// (or with a refused one) through: client_secret clients connect without a certificate, and for tls_client_auth
// the provider itself refuses an unverified certificate (certificateAuthorized below).
const server = https.createServer({
  cert: readFileSync(settings.cert),
  key: readFileSync(settings.key),
  ca: readFileSync(settings.ca),
  requestCert: true,
  rejectUnauthorized: false,
});

function peerCertificate(ctx) {
  const peer = ctx.socket.getPeerCertificate();
  if (!peer || !peer.raw) return undefined;
  const body = peer.raw.toString('base64').match(/.{1,64}/g).join('\n');
  return `-----BEGIN CERTIFICATE-----\n${body}\n-----END CERTIFICATE-----\n`;
}

// RFC 8705 2.1.2: tls_client_auth_san_uri must equal one of the certificate's URI subject alternative names.
function certificateSubjectMatches(ctx, property, expected) {
  if (property !== 'tls_client_auth_san_uri') return false;
  const names = new X509Certificate(peerCertificate(ctx)).subjectAltName ?? '';
  return names.split(', ').includes(`URI:${expected}`);
}

function resourceServer(ctx, resource) {
  if (resource !== settings.resource) throw new errors.InvalidTarget();
  return {
    audience: resource,
    scope: settings.scopes.join(' '),
    accessTokenTTL: settings.ttl_s,
    accessTokenFormat: 'jwt', // RFC 9068 JWT access tokens; without it they are opaque
    jwt: { sign: { alg: 'RS256' } },
  };
}

function groupClaims(ctx, token) {
  const groups = settings.groups[token.clientId] ?? [];
  // The flat list most providers can be told to send, and Keycloak's realm roles shape.
  return { groups, realm_access: { roles: groups } };
}

server.listen(settings.port, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `https://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: settings.clients,
    jwks: JSON.parse(readFileSync(settings.jwks, 'utf8')),
    clientAuthMethods: ['tls_client_auth', 'client_secret_basic', 'client_secret_post'],
    scopes: settings.scopes,
    ttl: { ClientCredentials: settings.ttl_s },
    extraTokenClaims: groupClaims,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        tlsClientAuth: true,
        getCertificate: peerCertificate,
        certificateAuthorized: (ctx) => ctx.socket.authorized,
        certificateSubjectMatches,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf,
        getResourceServerInfo: resourceServer,
        useGrantedResource: () => true,
      },
    },
  });
  provider.on('grant.success', (ctx) => record({ event: 'grant.success', client_id: ctx.oidc.client?.clientId }));
  provider.on('grant.error', (ctx, error) => record({
    event: 'grant.error', client_id: ctx.oidc.client?.clientId, error: error.error,
  }));
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ event: 'listening', issuer, port })}\n`);
});

// The test stops the provider with SIGTERM: close at once, open keep-alive connections included.
process.on('SIGTERM', () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
});
