// The playground's demo: a policy, a signing key and a token. The key is published here:
// it signs demo tokens in this page only. Never put it in a real policy.
export const DEMO_KEY = {
  kty: 'EC', crv: 'P-256', kid: 'playground-demo',
  x: '2KksVg7xANTMcVy1LhvpuMU3OjRQyNGA_mYBdCuHkS4',
  y: '9BDfqybCKYWsb1Us3FmoCF5R8f7oFIa88eo8sC4ZrRc',
  d: 'aiE-4BTi29N2JzyBfFq9a-ZtjDETPF7pFp8Cr--km2Q',
};

const { d: _private, ...publicKey } = DEMO_KEY;

export const DEMO_POLICY = {
  mode: 'enforce',
  providers: [{
    name: 'demo-idp',
    issuer: 'https://idp.example.com',
    audiences: ['https://api.example.com'],
    algorithms: ['ES256'],
    jwks: { keys: [publicKey] },
  }],
  rules: [
    { name: 'read-invoice', match: { methods: ['GET'], path: '/invoices/{id}' }, require: { scopes: ['invoices:read'] } },
    {
      name: 'pay-invoice',
      match: { methods: ['POST'], path: '/invoices/{id}/pay' },
      require: {
        scopes: ['invoices:pay'],
        task: { type: 'invoice_processing', actions: ['pay'], identifier: '{id}' },
      },
    },
    {
      name: 'pay-tool',
      match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'pay_invoice' } },
      require: { scopes: ['invoices:pay'], arguments: [{ path: 'amount', lte: 500 }] },
    },
    { name: 'read-tools', match: { methods: ['POST'], path: '/mcp', mcp: { tool: 'read_*' } }, require: { scopes: ['invoices:read'] } },
  ],
};

export function demoClaims(now) {
  return {
    iss: 'https://idp.example.com',
    aud: 'https://api.example.com',
    sub: 'agent-7',
    iat: now,
    exp: now + 600,
    scope: 'invoices:read invoices:pay',
    authorization_details: [{ type: 'invoice_processing', actions: ['pay'], identifier: '42' }],
  };
}

const b64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const text = (s) => new TextEncoder().encode(s);

/** An ES256 JWT of `claims` signed with `jwk` (a private P-256 JWK) by Web Crypto. */
export async function signES256(jwk, claims) {
  const key = await crypto.subtle.importKey('jwk', { ...jwk, ext: true }, { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
  const header = { alg: 'ES256', typ: 'JWT', kid: jwk.kid };
  const signed = `${b64url(text(JSON.stringify(header)))}.${b64url(text(JSON.stringify(claims)))}`;
  // Web Crypto's ECDSA signature is r || s: JWS's form already.
  const signature = await crypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, key, text(signed));
  return `${signed}.${b64url(signature)}`;
}
