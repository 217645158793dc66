// An HTTPS GET with an optional client certificate (mTLS), for the certificate-bound token
// tests. Usage: node https-get.mjs '{"url", "ca", "cert"?, "key"?, "headers"?}' (files by path);
// prints {status, headers, body}, or {status: 0, error}.
import fs from 'node:fs';
import https from 'node:https';

const request = JSON.parse(process.argv[2]);
const options = { method: 'GET', headers: request.headers ?? {}, ca: fs.readFileSync(request.ca) };
if (request.cert) {
  options.cert = fs.readFileSync(request.cert);
  options.key = fs.readFileSync(request.key);
}
const sent = https.request(request.url, options, (response) => {
  let body = '';
  response.setEncoding('utf8');
  response.on('data', (chunk) => { body += chunk; });
  response.on('end', () => console.log(JSON.stringify({ status: response.statusCode, headers: response.headers, body })));
});
sent.on('error', (error) => console.log(JSON.stringify({ status: 0, error: String(error) })));
sent.end();
