// The policy playground: the gate of @agentgate/edge (the same wasm build) decides a request
// written by hand, and the page shows what the client and the upstream would get, the audit
// record, and each requirement of the matched rule with whether it held (`agentgate eval`).
import { checkPolicy, createGate, initialize } from '../filters/edge-js/index.js';
import { DEMO_KEY, DEMO_POLICY, demoClaims, signES256 } from './demo.js';

const $ = (id) => document.getElementById(id);
const escape = (s) => String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);

// What a reason means when no rule's requirements could be checked.
const WHY = {
  missing_token: 'the request carries no token',
  malformed: 'the token is not a JWT',
  bad_signature: 'the signature does not verify with the provider\'s keys',
  unknown_kid: 'the token names a key the provider does not have',
  keys_unavailable: 'the provider\'s keys are fetched (jwks_uri or discovery), which this page does not do',
  unknown_issuer: 'no provider has this issuer',
  expired: 'the token has expired',
  not_yet_valid: 'the token is not valid yet',
  audience_mismatch: 'the token is for another audience',
  no_matching_rule: 'no rule matches this method and path: denied by default',
  non_canonical_path: 'the path is ambiguous (dot segments, //, encoded /, ;params…): refused before matching',
  non_canonical_method: 'the method is a case variant of a standard one',
};

const now = () => {
  const given = $('now').value.trim();
  return given === '' ? Date.now() / 1000 : Number(given);
};

function headerLines(text) {
  const headers = [];
  for (const line of text.split('\n')) {
    const at = line.indexOf(':', line.startsWith(':') ? 1 : 0);
    if (line.trim() === '' || at < 1) continue;
    headers.push([line.slice(0, at).trim().toLowerCase(), line.slice(at + 1).trim()]);
  }
  return headers;
}

/** The request as typed: a path is taken as sent (no URL normalization); a full URL gives the host too. */
function request() {
  const typed = $('url').value.trim();
  const full = typed.match(/^https?:\/\/([^/?#]+)(.*)$/i);
  const headers = headerLines($('headers').value);
  if (full) headers.unshift(['host', full[1]]);
  const token = $('token').value.trim();
  if (token) headers.unshift(['authorization', /^(bearer|dpop) /i.test(token) ? token : `Bearer ${token}`]);
  const body = $('body').value.trim();
  return { method: $('method').value, path: full ? (full[2] || '/') : typed, headers, body: body || undefined, now: now() };
}

function showPolicyError(error) {
  const box = $('policy-error');
  box.hidden = !error;
  box.innerHTML = error
    ? `${error.path ? `<span class="path">${escape(error.path)}</span>: ` : ''}${escape(error.message)}`
    : '';
}

function decide() {
  const policyText = $('policy').value;
  const error = checkPolicy(policyText, { keys: 'manual' });
  showPolicyError(error);
  if (error) {
    $('verdict').className = 'verdict';
    $('verdict').innerHTML = '<strong>policy error</strong><span class="detail">fix the policy to decide</span>';
    for (const id of ['client', 'upstream', 'audit']) $(id).textContent = '';
    $('explanation').innerHTML = '';
    return;
  }
  // A fresh gate for each decision: single-use tokens and rate limits start empty.
  const gate = createGate(policyText, { keys: 'manual' });
  try {
    const req = request();
    const explanation = gate.explain(req);
    const decision = gate.evaluate(req);
    const bodyRead = gate.bodyLimit(req.method, req.path) !== undefined;
    render(JSON.parse(policyText), req, decision, explanation, bodyRead);
  } catch (e) {
    $('verdict').className = 'verdict deny';
    $('verdict').innerHTML = `<strong>error</strong><span class="detail">${escape(e.message)}</span>`;
  } finally {
    gate.free();
  }
}

function render(policy, req, d, explanation, bodyRead) {
  const rule = d.audit.rule;
  const verdict = $('verdict');
  verdict.className = `verdict ${d.decision}`;
  verdict.dataset.decision = d.decision;
  const parts = [];
  if (d.decision === 'deny') parts.push(`${d.status} ${d.reason}`);
  else if (d.dryRun && d.reason) parts.push(`dry run: would deny (${d.reason})`);
  parts.push(rule ? `rule ${rule}` : 'no rule');
  if (req.body && !bodyRead) parts.push('not an MCP route: the body is not read');
  verdict.innerHTML = `<strong>${d.decision}</strong><span class="detail">${escape(parts.join(' · '))}</span>`;

  renderExplanation(policy, rule, explanation);

  if (d.decision === 'deny') {
    const lines = [`HTTP/1.1 ${d.status}`, ...Object.entries(d.headers).map(([n, v]) => `${n}: ${v}`), '', d.body ?? ''];
    $('client').textContent = lines.join('\n');
    $('upstream').innerHTML = '<span class="muted">nothing: the request stops at the gate</span>';
  } else {
    $('client').innerHTML = d.listFilter != null
      ? '<span class="muted">the upstream\'s answer, its tool list filtered to what this agent may call</span>'
      : '<span class="muted">the upstream\'s answer</span>';
    const removed = new Set(d.removeHeaders.map((n) => n.toLowerCase()));
    const set = Object.entries(d.headers).filter(([n]) => !n.startsWith(':'));
    const path = d.headers[':path'] ?? req.path;
    const lines = [`${escape(req.method)} ${escape(path)} HTTP/1.1`];
    for (const [name, value] of req.headers) {
      if (removed.has(name) || set.some(([n]) => n === name)) lines.push(`<del>${escape(name)}: ${escape(value)}</del>`);
      else lines.push(`${escape(name)}: ${escape(value)}`);
    }
    for (const [name, value] of set) lines.push(`<ins>${escape(name)}: ${escape(value)}</ins>`);
    if (req.body && bodyRead) lines.push('', escape(req.body));
    $('upstream').innerHTML = lines.join('\n');
  }
  $('audit').textContent = JSON.stringify(d.audit, null, 2);
}

function renderExplanation(policy, ruleName, explanation) {
  const box = $('explanation');
  if (!explanation.checks) {
    const why = WHY[explanation.reason] ?? '';
    box.innerHTML = `<p class="checks-none">No rule's requirements were checked: <code>${escape(explanation.reason)}</code>${why ? ` — ${escape(why)}` : ''}.</p>`;
    return;
  }
  const rule = (policy.rules ?? []).find((r) => r.name === ruleName) ?? {};
  const match = rule.match ? `<p>Rule <code>${escape(ruleName)}</code> matches <code>${escape(JSON.stringify(rule.match))}</code>.</p>` : '';
  if (explanation.checks.length === 0) {
    box.innerHTML = `${match}<p>The rule requires nothing beyond a valid token.</p>`;
    return;
  }
  const rows = explanation.checks.map((c) => `<tr data-requirement="${escape(c.requirement)}" data-held="${c.held}">
      <td><code>${escape(c.requirement)}</code></td>
      <td class="${c.held ? 'held' : 'failed'}">${c.held ? '✓ held' : '✗ failed'}</td>
      <td><code>${escape(JSON.stringify(rule.require?.[c.requirement] ?? ''))}</code></td>
      <td>${c.reason ? `<code>${escape(c.reason)}</code>` : ''}</td>
    </tr>`);
  box.innerHTML = `${match}<table class="checks"><thead><tr><th>requirement</th><th>result</th><th>the rule says</th><th>reason</th></tr></thead>
    <tbody>${rows.join('')}</tbody></table>`;
}

async function signDemo() {
  let claims;
  try {
    claims = JSON.parse($('claims').value);
  } catch (e) {
    $('verdict').className = 'verdict deny';
    $('verdict').innerHTML = `<strong>claims</strong><span class="detail">${escape(e.message)}</span>`;
    return;
  }
  $('token').value = await signES256(DEMO_KEY, claims);
  decide();
}

async function main() {
  await initialize(new URL('../filters/edge-js/pkg/agentgate_edge_bg.wasm', import.meta.url));
  $('policy').value = JSON.stringify(DEMO_POLICY, null, 2);
  $('claims').value = JSON.stringify(demoClaims(Math.floor(Date.now() / 1000)), null, 2);
  $('decide').addEventListener('click', decide);
  $('sign').addEventListener('click', signDemo);
  $('demo-policy').addEventListener('click', () => {
    $('policy').value = JSON.stringify(DEMO_POLICY, null, 2);
    decide();
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) decide();
  });
  await signDemo();
  $('ready').textContent = 'ready';
  $('ready').dataset.ready = 'true';
}

main().catch((e) => {
  $('ready').textContent = `could not load the gate: ${e.message}`;
});
