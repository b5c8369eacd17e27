// Loopback OpenID Connect provider for the moko_guard test suite.
//
// Built on oidc-provider 9.13.3 with its development interactions: the login
// form accepts any login name and any password, and the consent form is one
// button. It keeps everything in memory and is for tests only.
//
// Environment:
//   OP_PORT     listen port on 127.0.0.1 (required, 1-65535)
//   OP_HOST     optional; only 127.0.0.1 is accepted
//   OP_ISSUER   issuer identifier (default http://127.0.0.1:<OP_PORT>)
//   OP_CLIENTS  JSON array of client metadata objects (required, at least one)
//   OP_CONFORM_ID_TOKEN_CLAIMS
//               "1" keeps the library default conformIdTokenClaims=true, so ID
//               tokens from the code flow carry no scope claims (email, name)
//               and relying parties must read them from the userinfo endpoint.
//               Unset or "0" puts the scope claims into the ID token as well.
//
// stdout carries exactly one line, "ready <issuer>", once the server listens.
// Library notices, request errors and back-channel logout results go to stderr.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import process from 'node:process';

import Provider from 'oidc-provider';

// oidc-provider prints its notices with console.info, which writes to stdout.
// Send them to stderr so stdout carries only the ready line.
console.info = console.error;

const LISTEN_HOST = '127.0.0.1';
const LOOPBACK_HOSTNAMES = new Set(['127.0.0.1', 'localhost', '[::1]']);

function fail(message) {
  console.error(`oidc test provider: ${message}`);
  process.exit(2);
}

function readPort() {
  const raw = process.env.OP_PORT;
  if (raw === undefined || raw === '') {
    fail('OP_PORT is missing: set it to a free TCP port on 127.0.0.1');
  }
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    fail(`OP_PORT=${JSON.stringify(raw)} is invalid: expected an integer from 1 to 65535`);
  }
  return port;
}

function checkHost() {
  const host = process.env.OP_HOST;
  if (host !== undefined && host !== '' && host !== LISTEN_HOST) {
    fail(`OP_HOST=${JSON.stringify(host)} is rejected: this provider listens on ${LISTEN_HOST} only`);
  }
}

function checkLoopbackUrl(clientId, field, value) {
  let url;
  try {
    url = new URL(value);
  } catch {
    fail(`client ${clientId}: ${field} ${JSON.stringify(value)} is not a valid URL`);
  }
  if (!LOOPBACK_HOSTNAMES.has(url.hostname)) {
    fail(`client ${clientId}: ${field} ${value} is rejected: only loopback hosts (127.0.0.1, localhost, [::1]) are allowed`);
  }
}

// Parse OP_CLIENTS and fill the defaults for the code flow. Every URL the
// provider redirects a browser to or sends a back-channel logout request to
// must be on loopback.
function readClients() {
  const raw = process.env.OP_CLIENTS;
  if (raw === undefined || raw === '') {
    fail('OP_CLIENTS is missing: set it to a JSON array of client metadata objects');
  }
  let clients;
  try {
    clients = JSON.parse(raw);
  } catch (err) {
    fail(`OP_CLIENTS is not valid JSON: ${err.message}`);
  }
  if (!Array.isArray(clients) || clients.length === 0) {
    fail('OP_CLIENTS must be a non-empty JSON array of client metadata objects');
  }

  return clients.map((client, index) => {
    if (client === null || typeof client !== 'object' || Array.isArray(client)) {
      fail(`OP_CLIENTS[${index}] must be a JSON object`);
    }
    const clientId = client.client_id ?? `OP_CLIENTS[${index}]`;
    for (const field of ['redirect_uris', 'post_logout_redirect_uris']) {
      for (const uri of client[field] ?? []) {
        checkLoopbackUrl(clientId, field, uri);
      }
    }
    if (client.backchannel_logout_uri !== undefined) {
      checkLoopbackUrl(clientId, 'backchannel_logout_uri', client.backchannel_logout_uri);
    }
    return {
      grant_types: ['authorization_code'],
      response_types: ['code'],
      ...client,
    };
  });
}

// Derive the account claims from the login name typed into the login form.
// The login becomes the subject. A login without "@" gets an example.com
// address, and a login starting with "unverified" gets email_verified=false.
function accountClaims(login) {
  const email = login.includes('@') ? login : `${login}@example.com`;
  const localPart = login.split('@')[0];
  return {
    sub: login,
    email,
    email_verified: !login.startsWith('unverified'),
    name: localPart,
    preferred_username: localPart,
  };
}

// Outgoing requests (back-channel logout, and client jwks_uri or
// sector_identifier_uri if a client sets them). oidc-provider 9.13.3 passes an
// undici dispatcher that destroys sockets to special-use addresses, 127.0.0.0/8
// included, so a back-channel logout to a loopback relying party fails with
// "fetch failed". This provider sends requests to loopback hosts only, so it
// drops that dispatcher, rejects every other host and does not follow redirects.
async function loopbackFetch(url, options) {
  const target = new URL(url);
  if (!LOOPBACK_HOSTNAMES.has(target.hostname)) {
    throw new Error(`outgoing request to ${target.origin} rejected: this provider sends requests to loopback hosts only`);
  }
  const { dispatcher: _ssrfDispatcher, ...fetchOptions } = options;
  return globalThis.fetch(target, { ...fetchOptions, redirect: 'manual' });
}

function signingKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: `test-${randomBytes(6).toString('base64url')}`,
    use: 'sig',
    alg: 'RS256',
  };
}

checkHost();
const port = readPort();
const issuer = process.env.OP_ISSUER || `http://${LISTEN_HOST}:${port}`;
const clients = readClients();
const conformIdTokenClaims = process.env.OP_CONFORM_ID_TOKEN_CLAIMS === '1';

const configuration = {
  clients,
  scopes: ['openid', 'email', 'profile'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  conformIdTokenClaims,
  fetch: loopbackFetch,
  async findAccount(_ctx, id) {
    if (typeof id !== 'string' || id === '') {
      return undefined;
    }
    return {
      accountId: id,
      async claims() {
        return accountClaims(id);
      },
    };
  },
  // Lifetimes in seconds. The authorization code is short so that a test
  // which stalls between login and code exchange fails instead of passing late.
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    Grant: 3600,
    IdToken: 3600,
    Interaction: 3600,
    Session: 3600,
  },
  // A fresh key for each start, so relying parties must read jwks_uri.
  jwks: { keys: [signingKey()] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // PKCE stays at the library default: required for public clients
  // (token_endpoint_auth_method "none"), optional for confidential ones, and
  // S256 is the only code_challenge_method that oidc-provider 9 accepts.
  features: {
    devInteractions: { enabled: true },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
};

let provider;
try {
  provider = new Provider(issuer, configuration);
} catch (err) {
  fail(`invalid provider configuration: ${err.error_description || err.message}`);
}

// Build every client once now, so invalid metadata stops the start with a
// message instead of failing the first request that names the client.
for (const client of clients) {
  try {
    await provider.Client.find(client.client_id);
  } catch (err) {
    fail(`client ${client.client_id}: invalid metadata: ${err.error_description || err.message}`);
  }
}

const errorEvents = [
  'server_error',
  'authorization.error',
  'grant.error',
  'userinfo.error',
  'end_session.error',
  'end_session_confirm.error',
  'jwks.error',
  'discovery.error',
];
for (const event of errorEvents) {
  provider.on(event, (_ctx, err) => {
    console.error(`${event}: ${err?.error_description || err?.message || err}`);
  });
}
provider.on('backchannel.success', (_ctx, client, accountId, sid) => {
  console.error(`backchannel.success: client_id=${client.clientId} sub=${accountId} sid=${sid}`);
});
provider.on('backchannel.error', (_ctx, err, client, accountId, sid) => {
  const cause = err?.cause ? ` (${err.cause.message || err.cause})` : '';
  console.error(`backchannel.error: client_id=${client.clientId} sub=${accountId} sid=${sid}: ${err?.message || err}${cause}`);
});

const server = provider.listen(port, LISTEN_HOST, () => {
  console.log(`ready ${issuer}`);
});
server.on('error', (err) => {
  fail(`cannot listen on ${LISTEN_HOST}:${port}: ${err.message}`);
});

function shutdown(signal) {
  console.error(`${signal} received, closing the server`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  // Exit after 2 s even if a connection is still open.
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
