// A real OAuth 2.0 authorization server for agentgate's end-to-end tests: oidc-provider
// (a certified implementation) on 127.0.0.1, issuing RFC 9068 `at+jwt` access tokens to agent
// clients through the client credentials grant, with RFC 8707 resource indicators, RFC 9396
// authorization_details and RFC 9449 DPoP binding. Its keys are made at start and published
// only through its own discovery document and jwks_uri, so the gate must find them there.
//
// Usage: node idp.mjs   — prints one JSON line {"issuer", "port"} on stdout once it serves,
// and runs until killed (or until its stdin closes, so a crashed test leaves nothing behind).

import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

// The resource servers this provider issues tokens for; `other` exists so a test can hold a
// genuine token for another audience.
const RESOURCES = {
  'https://api.example.com': 'invoices:read invoices:pay',
  'https://other.example.com': 'invoices:read invoices:pay',
};

// Agent clients (RFC 6749 §4.4). `dpop-agent` may only get DPoP-bound tokens.
const CLIENTS = [
  { client_id: 'billing-agent', client_secret: 'billing-agent-secret' },
  { client_id: 'dpop-agent', client_secret: 'dpop-agent-secret', dpop_bound_access_tokens: true },
].map((client) => ({
  ...client,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope: 'invoices:read invoices:pay',
  authorization_details_types: ['invoice_processing'],
}));

function signingKey(kid, alg, type, options) {
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
}

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: CLIENTS,
    scopes: ['invoices:read', 'invoices:pay'],
    // Access tokens are signed ES256 (the resource server config below); RS256 signs the
    // ID tokens oidc-provider insists on being able to make.
    jwks: {
      keys: [
        signingKey('at-es256', 'ES256', 'ec', { namedCurve: 'P-256' }),
        signingKey('id-rs256', 'RS256', 'rsa', { modulusLength: 2048 }),
      ],
    },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    enabledJWA: { dPoPSigningAlgValues: ['ES256', 'Ed25519', 'EdDSA', 'PS256', 'RS256'] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      dPoP: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'https://api.example.com',
        useGrantedResource: () => true,
        getResourceServerInfo(ctx, resource) {
          const scope = RESOURCES[resource];
          if (!scope) throw new errors.InvalidTarget();
          return {
            scope,
            audience: resource,
            accessTokenFormat: 'jwt',
            accessTokenTTL: 300,
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
      richAuthorizationRequests: {
        enabled: true,
        types: {
          invoice_processing: {
            validate(ctx, detail) {
              const ok = Array.isArray(detail.actions) && typeof detail.identifier === 'string';
              if (!ok) throw new errors.InvalidAuthorizationDetails('invoice_processing needs actions and identifier');
            },
          },
        },
        // The client credentials grant has no user consent to narrow the request: what was
        // requested (and validated above) is what the token carries.
        authorizationDetailsForAccessToken(ctx) {
          const requested = ctx.oidc.params.authorization_details;
          return requested === undefined ? undefined : JSON.parse(requested);
        },
      },
    },
  });
  // Errors the provider answers with go to stderr, where a failing test shows them.
  provider.on('server_error', (ctx, error) => console.error('server_error', error));
  provider.on('grant.error', (ctx, error) => console.error('grant.error', error.message, error.error_description ?? ''));
  server.on('request', provider.callback());
  console.log(JSON.stringify({ issuer, port }));
});

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
