// An agent's OAuth client for the tests: finds the token endpoint by discovery, gets an access
// token with the client credentials grant and, with `dpop`, binds it to a fresh key whose
// proofs (for the token request and then for resource requests) are made by the npm `dpop`
// library — a real RFC 9449 client, independent of agentgate.
//
// Usage: node client.mjs '<json request>'; prints one JSON line:
//   request:  {issuer, client_id?, client_secret, resource?, scope?, authorization_details?,
//              dpop?: "ES256" | "Ed25519" | "PS256" | "RS256", proofs?: [{htm, htu, access_token?}],
//              requests?: [{method, url}], nonce?}
//            (a proof's access_token: another token than the one just issued, as a thief would)
//   answer:   {status, token: <token endpoint answer>, jkt?, proofs: [<proof JWS>...],
//              responses: [{status, retried, nonce, body}], nonce}
// `requests` are made with the token and a fresh proof each, as a DPoP client does: the
// resource server's DPoP-Nonce is kept and put in later proofs, and a 401 use_dpop_nonce is
// retried once with the nonce it brought (RFC 9449 §9).

import { calculateThumbprint, generateKeyPair, generateProof } from 'dpop';

const request = JSON.parse(process.argv[2]);

// Without client_id, only proofs are made (with a key of its own): a thief holding a token.
const endpoint = request.client_id === undefined ? undefined
  : (await fetch(`${request.issuer}/.well-known/openid-configuration`).then((r) => r.json())).token_endpoint;

const form = new URLSearchParams({ grant_type: 'client_credentials' });
for (const name of ['resource', 'scope']) {
  if (request[name] !== undefined) form.set(name, request[name]);
}
if (request.authorization_details !== undefined) {
  form.set('authorization_details', JSON.stringify(request.authorization_details));
}

const keypair = request.dpop ? await generateKeyPair(request.dpop) : undefined;

async function tokenRequest(nonce) {
  const headers = {
    authorization: `Basic ${Buffer.from(`${request.client_id}:${request.client_secret}`).toString('base64')}`,
    'content-type': 'application/x-www-form-urlencoded',
  };
  if (keypair) headers.dpop = await generateProof(keypair, endpoint, 'POST', nonce);
  const response = await fetch(endpoint, { method: 'POST', headers, body: form });
  return { response, body: await response.json() };
}

let response;
let body = {};
if (endpoint) {
  ({ response, body } = await tokenRequest());
  // A server that wants nonces says so once (RFC 9449 §8).
  if (body.error === 'use_dpop_nonce' && response.headers.get('dpop-nonce')) {
    ({ response, body } = await tokenRequest(response.headers.get('dpop-nonce')));
  }
}

const answer = { status: response?.status ?? 0, token: body, proofs: [] };
if (keypair) {
  answer.jkt = await calculateThumbprint(keypair.publicKey);
  for (const { htm, htu, access_token: token = body.access_token } of request.proofs ?? []) {
    answer.proofs.push(await generateProof(keypair, htu, htm, undefined, token));
  }
}
answer.responses = [];
let nonce = request.nonce ?? undefined;
for (const { method, url } of request.requests ?? []) {
  const send = async () => {
    const headers = { authorization: `DPoP ${body.access_token}` };
    headers.dpop = await generateProof(keypair, url, method, nonce, body.access_token);
    const response = await fetch(url, { method, headers });
    if (response.headers.get('dpop-nonce')) nonce = response.headers.get('dpop-nonce');
    return response;
  };
  let response = await send();
  let retried = false;
  if (response.status === 401 && /error="use_dpop_nonce"/.test(response.headers.get('www-authenticate') ?? '')) {
    retried = true;
    response = await send();
  }
  answer.responses.push({ status: response.status, retried, nonce: response.headers.get('dpop-nonce'), body: await response.text() });
}
answer.nonce = nonce;
console.log(JSON.stringify(answer));
