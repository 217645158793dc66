// ES256 tokens for the tests, signed with Node's own crypto (an independent JOSE signer).
import { createPrivateKey, sign } from 'node:crypto';

const b64 = (data) => Buffer.from(data).toString('base64url');

export function es256(jwk, claims, { tamper = false } = {}) {
  const key = createPrivateKey({ key: jwk, format: 'jwk' });
  const signed = `${b64(JSON.stringify({ alg: 'ES256', kid: jwk.kid, typ: 'JWT' }))}.${b64(JSON.stringify(claims))}`;
  const signature = sign('sha256', Buffer.from(signed), { key, dsaEncoding: 'ieee-p1363' });
  if (tamper) signature[signature.length - 1] ^= 1;
  return `${signed}.${b64(signature)}`;
}
