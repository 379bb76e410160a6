// The end-to-end tests' OIDC provider, and their token minter.
//
//   node provider.mjs serve PORT KEYFILE PEOPLE_JSON
//     An oidc-provider issuer at http://127.0.0.1:PORT with discovery and
//     JWKS. Each person of PEOPLE_JSON ({"alice": ["dba"], ...}) is a client
//     (secret: NAME-secret) that gets an RS256 JWT access token for the
//     audience `urn:interceptor:approvals` by client credentials; the token's
//     `sub` is the person, its `groups` claim their groups. The signing key
//     is made on first use and kept in KEYFILE (a private JWK). Prints
//     `ready ISSUER` once listening.
//
//   node provider.mjs token ISSUER WHO
//     Prints WHO's access token from the provider at ISSUER.
//
//   node provider.mjs mint KEYFILE CLAIMS_JSON [ALG] [KID] [foreign]
//     Prints a JWT with CLAIMS_JSON signed by the provider's key (or, with
//     `foreign`, by a key of its own under the provider's kid). ALG HS256
//     signs with the provider's public key as the shared secret.
import fs from 'node:fs';
import * as jose from 'jose';

const AUDIENCE = 'urn:interceptor:approvals';

async function key(file) {
  if (fs.existsSync(file)) return JSON.parse(fs.readFileSync(file, 'utf8'));
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  jwk.kid = 'test-' + Math.random().toString(36).slice(2, 10);
  jwk.alg = 'RS256';
  jwk.use = 'sig';
  fs.writeFileSync(file, JSON.stringify(jwk), { mode: 0o600 });
  return jwk;
}

async function serve(port, keyFile, people) {
  const { default: Provider } = await import('oidc-provider');
  const issuer = `http://127.0.0.1:${port}`;
  const jwk = await key(keyFile);
  const clients = Object.keys(people).map((id) => ({
    client_id: id,
    client_secret: `${id}-secret`,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
  }));
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [jwk] },
    scopes: ['approve'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => AUDIENCE,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'approve',
          audience: AUDIENCE,
          accessTokenTTL: 600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => ({
      sub: token.clientId,
      groups: people[token.clientId] ?? [],
    }),
  });
  provider.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
}

async function mint(keyFile, claims, alg = 'RS256', kid, foreign) {
  const jwk = await key(keyFile);
  const header = { alg, kid: kid || jwk.kid, typ: 'JWT' };
  let signer;
  if (alg === 'HS256') {
    const pub = await jose.importJWK({ kty: jwk.kty, n: jwk.n, e: jwk.e }, 'RS256');
    const pem = await jose.exportSPKI(pub);
    signer = new TextEncoder().encode(pem);
  } else if (foreign) {
    signer = (await jose.generateKeyPair(alg)).privateKey;
  } else {
    signer = await jose.importJWK(jwk, alg);
  }
  const token = await new jose.SignJWT(claims).setProtectedHeader(header).sign(signer);
  console.log(token);
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'serve') {
  await serve(Number(args[0]), args[1], JSON.parse(args[2]));
} else if (mode === 'token') {
  const [issuer, who] = args;
  const resp = await fetch(`${issuer}/token`, {
    method: 'POST',
    body: new URLSearchParams({
      grant_type: 'client_credentials', client_id: who, client_secret: `${who}-secret`,
      scope: 'approve', resource: AUDIENCE,
    }),
  });
  const body = await resp.json();
  if (!body.access_token) {
    console.error(JSON.stringify(body));
    process.exit(1);
  }
  console.log(body.access_token);
} else if (mode === 'mint') {
  await mint(args[0], JSON.parse(args[1]), args[2], args[3], args[4] === 'foreign');
} else {
  console.error('usage: provider.mjs serve PORT KEYFILE PEOPLE_JSON | token ISSUER WHO | mint KEYFILE CLAIMS_JSON [ALG] [KID] [foreign]');
  process.exit(2);
}
